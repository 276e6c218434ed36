# vLLM's CUDA build with the slmpack profiler, from PyPI packages: serves and profiles on NVIDIA
# GPUs. The CUDA libraries come as PyPI wheels (nvidia-*), the driver from the node (the NVIDIA
# container runtime), so the base is the same python:3.11-slim as the other images.
#   make image-engine        (about 10 GB; its size and `vllm --version` are in benchmarks/newcomer.md)
FROM docker.io/library/python:3.11-slim AS build
ARG VLLM_VERSION=0.32.0
# No pip configuration (PIP_CONFIG_FILE=/dev/null): a build host's may point at CPU-only torch
# wheels, which satisfy vLLM's torch pin without CUDA. Only its CA bundle is used.
ENV PIP_CONFIG_FILE=/dev/null
RUN python3 -m venv /opt/slmpack \
 && /opt/slmpack/bin/pip install --cert /run/host-ca.crt --no-cache-dir "vllm==${VLLM_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN /opt/slmpack/bin/pip install --cert /run/host-ca.crt --no-cache-dir --no-deps . \
 && find /opt/slmpack -name '__pycache__' -prune -exec rm -rf {} +

FROM docker.io/library/python:3.11-slim
# Triton and vLLM's CUDA kernels compile at start with gcc (against Python.h); libnuma binds threads.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev python3-dev libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp slmpack
COPY --from=build /opt/slmpack /opt/slmpack
ENV PATH=/opt/slmpack/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp
USER 10001:10001
EXPOSE 8000
CMD ["python3", "-m", "vllm.entrypoints.openai.api_server"]
