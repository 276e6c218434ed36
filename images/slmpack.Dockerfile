# The operator and the exporter: one build, two targets.
#   buildah bud --target operator -t slmpack/operator:0.1.0 -f images/slmpack.Dockerfile .
#   buildah bud --target exporter -t slmpack/exporter:0.1.0 -f images/slmpack.Dockerfile .
FROM docker.io/library/python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python3 -m venv /opt/slmpack \
 && /opt/slmpack/bin/pip install --no-cache-dir . \
 && find /opt/slmpack -name '__pycache__' -prune -exec rm -rf {} +

FROM docker.io/library/python:3.11-slim AS runtime
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp slmpack
COPY --from=build /opt/slmpack /opt/slmpack
ENV PATH=/opt/slmpack/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp MPLCONFIGDIR=/tmp
USER 10001:10001
ENTRYPOINT ["slmpack"]

FROM runtime AS operator
CMD ["operator"]

FROM runtime AS exporter
EXPOSE 9400
CMD ["exporter"]
