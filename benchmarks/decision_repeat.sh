#!/usr/bin/env bash
# Three profiles in a row of the CPU example (examples/slmdeployment-cpu.yaml), with the arguments its
# profiling Job gets, on this machine: do they reach the same decision? Raw reports and logs under
# benchmarks/decision_repeat/, with the CPU, its flags and the load average before each run.
#   bash benchmarks/decision_repeat.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/decision_repeat
mkdir -p "$out"
model=${MODEL_DIR:-$HOME/.cache/slmpack/models/SmolLM2-135M-Instruct}
{ grep -m1 'model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; nproc; } > "$out/machine.txt"
for run in $(seq 1 "${1:-3}"); do
  { date -u +%FT%TZ; cat /proc/loadavg; } > "$out/run$run.load"
  PYTHONPATH=operator .venv/bin/python -m slmpack.cli profile --engine vllm --device cpu --model "$model" \
    --max-model-len 512 --min-batch 1 --max-batch 128 --input-tokens 32 --output-tokens 16 --max-replicas 2 \
    --cpu-kv-cache-space-gib 1 --replication-budget-seconds 60 --precision-percent 10 --engine-arg=--enforce-eager \
    --port-base 18500 --out "$out/run$run" > "$out/run$run.log" 2>&1
  { date -u +%FT%TZ; cat /proc/loadavg; } >> "$out/run$run.load"
done
