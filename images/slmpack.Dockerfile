# The operator and the exporter: one build, two targets.
#   buildah bud --target operator -t slmpack/operator:0.1.0 -f images/slmpack.Dockerfile .
#   buildah bud --target exporter -t slmpack/exporter:0.1.0 -f images/slmpack.Dockerfile .
# One chain of layers with slmpack's own source last, so a source change rebuilds only that layer.
# pip's bytecode stays: the root filesystem is read-only, so Python could not cache it at run time.
FROM docker.io/library/python:3.11-slim AS runtime
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp slmpack
COPY constraints.txt pyproject.toml /src/
RUN python3 -m venv /opt/slmpack \
 && python3 -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /src/requirements.txt \
 && /opt/slmpack/bin/pip install --no-cache-dir -c /src/constraints.txt -r /src/requirements.txt
COPY README.md /src/
COPY operator /src/operator
RUN /opt/slmpack/bin/pip install --no-cache-dir --no-deps /src \
 && rm -rf /src
ENV PATH=/opt/slmpack/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp MPLCONFIGDIR=/tmp
USER 10001:10001
ENTRYPOINT ["slmpack"]

FROM runtime AS operator
CMD ["operator"]

FROM runtime AS exporter
EXPOSE 9400
CMD ["exporter"]
