"""What a request's shape costs on this CPU: one vLLM CPU engine (two threads, as the sweep's), closed loops
at batch 1 and 32 for prompts of 32 or 8 tokens and completions of 16 or 8, the requests per second of each.

    PYTHONPATH=operator .venv/bin/python benchmarks/request_shapes.py \
        --model ~/.cache/slmpack/models/SmolLM2-135M-Instruct > benchmarks/e2e/request-shapes-DATE.txt

It chose the CPU example's workload (examples/slmdeployment-cpu.yaml): every probe and replication run pays
each request's prefill and decode, so the shape sets how long a profile takes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from slmpack.core.summary import summarize
from slmpack.profiler.engines import VllmEngine, stop
from slmpack.profiler.loadgen import Workload, closed_loop
from slmpack.profiler.run import environment

SHAPES = ((32, 16), (32, 8), (8, 16), (8, 8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=18300)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {environment(None)}, "
          f"load {Path('/proc/loadavg').read_text().strip()}")
    os.environ["OMP_NUM_THREADS"] = "2"
    engine = VllmEngine(model=args.model, device="cpu", max_model_len=512, dtype="float32",
                        extra_args=["--enforce-eager"])
    began = time.monotonic()
    server = engine.start(args.port, 128)
    print(f"engine started in {time.monotonic() - began:.1f} s", flush=True)
    try:
        for batch in (1, 32):
            for shape in SHAPES:
                workload = Workload(*shape)
                asyncio.run(closed_loop([server.endpoint], batch, 4, workload))  # warm-up
                requests = 6 if batch == 1 else 3 * batch
                results, duration = asyncio.run(closed_loop([server.endpoint], batch, requests, workload))
                point = summarize(batch, results, duration)
                print(f"batch {batch} input {shape[0]} output {shape[1]}: {point.request_throughput_per_s} "
                      f"requests/s, {point.output_throughput_tokens_per_s} output tokens/s, {requests} requests in "
                      f"{duration:.1f} s", flush=True)
    finally:
        stop(server)


if __name__ == "__main__":
    main()
