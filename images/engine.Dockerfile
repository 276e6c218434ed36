# vLLM's CUDA image with the slmpack profiler: serves and profiles on NVIDIA GPUs.
FROM docker.io/vllm/vllm-openai:v0.11.0
COPY pyproject.toml README.md /src/
COPY operator /src/operator
RUN pip install --no-cache-dir "/src" && rm -rf /src \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp slmpack
ENV HOME=/tmp PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000
ENTRYPOINT []
CMD ["python3", "-m", "vllm.entrypoints.openai.api_server"]
