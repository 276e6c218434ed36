"""Write the recorded-curve fixtures in tests/data/curves/.

Each curve follows the shape measured for small models on one H100 with vLLM: ITL
flat while the GPU has idle compute, then rising roughly linearly once the batch
saturates it. Parameters per model: ITL at B=1 (ms), the saturation batch, and the
steepness. Run `python tests/data/make_curves.py` to regenerate.
"""

import json
from pathlib import Path

GRID = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
MODELS = {  # name: (ITL at B=1 in ms, saturation batch, exponent)
    "smollm2-135m-h100": (3.1, 48, 1.15),
    "qwen2.5-0.5b-h100": (4.0, 32, 1.2),
    "llama3.2-1b-h100": (5.2, 24, 1.1),
    "opt-1.3b-h100": (6.0, 16, 1.05),
    "phi-2.7b-h100": (8.5, 12, 1.0),
}
OUTPUT_TOKENS = 128


def point(batch, itl1, saturation, exponent):
    itl = itl1 * (1 + (batch / saturation) ** exponent) / (1 + (1 / saturation) ** exponent)
    ttft = 2.5 * itl
    e2e = ttft + (OUTPUT_TOKENS - 1) * itl
    output_tps = batch * OUTPUT_TOKENS / (e2e / 1000)
    return {
        "batchSize": batch, "completed": 4 * batch, "failed": 0,
        "requestThroughputPerS": round(output_tps / OUTPUT_TOKENS, 4),
        "outputThroughputTokensPerS": round(output_tps, 2),
        "itlMs": {"mean": round(itl, 3), "p50": round(itl, 3), "p99": round(itl * 1.6, 3)},
        "ttftMs": {"mean": round(ttft, 3), "p50": round(ttft, 3), "p99": round(ttft * 2.0, 3)},
        "e2eLatencyMs": {"mean": round(e2e, 2)},
    }


if __name__ == "__main__":
    out = Path(__file__).parent / "curves"
    out.mkdir(exist_ok=True)
    for name, shape in MODELS.items():
        points = [point(b, *shape) for b in GRID]
        (out / f"{name}.json").write_text(json.dumps({"model": name, "points": points}, indent=1) + "\n")
