"""Engine start, cold and warm: what a cache of vLLM's compilation and warm-up saves each start.

Cold: vLLM's cache root and torch inductor's cache are fresh, empty directories, as in a
pod whose /tmp is a new emptyDir. Warm: the same directories again, as a volume kept
between the profiling Job and the replicas of one node would be. Each start is timed
from launch to a healthy /health, with the settings the profiler uses.

    PYTHONPATH=operator python benchmarks/profiling_speed.py --model ~/.cache/slmpack/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from slmpack.api.models import Device
from slmpack.core.manifests import engine_cache_env
from slmpack.profiler.engines import VllmEngine, stop
from slmpack.profiler.run import environment

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=HERE / "profiling_speed" / "starts.json")
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="slmpack-engine-cache-"))
    env = engine_cache_env(Device.cpu, str(cache))  # what a CPU deployment with spec.engine.cache sets
    engine = VllmEngine(args.model, "cpu", 1024, args.dtype, log_dir=args.out.parent / "logs")
    engine.log_dir.mkdir(parents=True, exist_ok=True)
    starts = []
    for label in ("cold", "warm"):
        load = Path("/proc/loadavg").read_text().strip()
        began = time.monotonic()
        server = engine.start(18460, args.max_num_seqs, extra_env=env, name=label)
        seconds = round(time.monotonic() - began, 1)
        stop(server)
        starts.append({"start": label, "seconds": seconds, "load_average_before": load})
        print(f"{label}: {seconds} s (load average before: {load})", flush=True)
    result = {"environment": environment(None), "model": args.model, "dtype": args.dtype,
              "max_num_seqs": args.max_num_seqs, "cache_env": env, "starts": starts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
