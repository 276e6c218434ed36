#!/usr/bin/env bash
# The newcomer's setup costs, as benchmarks/newcomer.md reports them. Raw output goes to
# benchmarks/newcomer/. Run from the repository root, as root, with the Kubernetes binaries and
# helm already cached (the cold Kubernetes build and image builds are timed by their own logs).
#   benchmarks/newcomer.sh cold    a fresh virtual environment, pinned, with no pip cache
#   benchmarks/newcomer.sh warm    what a second `make test` spends before its first test
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/newcomer
mkdir -p "$OUT"
stamp() { date -u +%FT%TZ; }
seconds() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }

case "${1:-}" in
  cold)
    rm -rf build/bench-venv
    { echo "# $(stamp) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
      echo "cold_venv_seconds $(PIP_NO_CACHE_DIR=1 seconds make deps VENV=build/bench-venv)"
      echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"; } | tee -a "$OUT/cold.txt"
    rm -rf build/bench-venv ;;
  warm)
    # Everything `make test` does before pytest: deps lint k8s-binaries helm images.
    make -s deps k8s-binaries helm images >/dev/null  # make sure everything is in place first
    { echo "# $(stamp) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
      for run in 1 2 3; do
        echo "run $run setup_seconds $(seconds make -s deps k8s-binaries helm images)" \
             "lint_seconds $(seconds make -s lint)"
      done; } | tee -a "$OUT/warm.txt" ;;
  *) sed -n '2,7p' "$0" >&2; exit 2 ;;
esac
