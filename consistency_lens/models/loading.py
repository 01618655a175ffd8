"""Load any HF causal LM (hub name, local directory, or the embedded alias) frozen, with its tokenizer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from consistency_lens.config import LensConfig
from consistency_lens.errors import LensError
from consistency_lens.models import embedded
from consistency_lens.models.adapter import ModelParts, contiguous_head, find_parts
from consistency_lens.utils.dist import resolve_device


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer and identity."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    parts: ModelParts
    name: str
    """What the user asked for (hub name, path or alias)."""
    fingerprint: str
    """Hub revision or content hash, recorded in dumps and lenses."""

    @property
    def pad_id(self) -> int:
        """Id used to pad batches (the tokenizer's pad, which loading sets to EOS when missing)."""
        return self.tokenizer.pad_token_id or 0


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 where the hardware runs it fast, else fp32."""
    if spec != "auto":
        return getattr(torch, spec)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _fingerprint(model: torch.nn.Module, source: Path | None) -> str:
    revision = getattr(model.config, "_commit_hash", None)
    if revision:
        return f"revision:{revision}"
    if source is not None and (source / "fingerprint.txt").is_file():
        return (source / "fingerprint.txt").read_text().strip()
    digest = hashlib.sha256()
    for tensor in list(model.state_dict().values())[:4]:
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[: 1 << 20])
    return f"weights-sha256:{digest.hexdigest()[:16]}"


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, when its config says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_slug(name: str) -> str:
    """A directory-safe short name for a model (`org/name` -> `name`)."""
    return Path(name.rstrip("/")).name or name


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of `name`, with a pad token."""
    source = embedded.embedded_model_dir() if name == embedded.ALIAS else name
    try:
        tok = AutoTokenizer.from_pretrained(
            str(source), revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError, KeyError) as err:
        # transformers raises ValueError/TypeError for a folder without (usable) tokenizer files.
        raise LensError(
            f"Could not load the tokenizer of model '{name}' ({_first_line(err)}); the model "
            "folder needs its tokenizer files (tokenizer.json or the tokenizer's vocab files)."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def hf_attention(attn_implementation: str) -> str | None:
    """The `attn_implementation` to hand transformers: `auto` is None, its own choice (sdpa where
    the model class supports it, eager otherwise; Gemma 2 has no sdpa path)."""
    return None if attn_implementation == "auto" else attn_implementation


def load_model(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
    device_map: str | None = None,
) -> LoadedModel:
    """Load `name` frozen in eval mode on `device`, or spread by `device_map` (e.g. `auto`)."""
    local: Path | None = None
    if name == embedded.ALIAS:
        local = embedded.embedded_model_dir()
    elif Path(name).exists():
        local = Path(name)
    elif name.startswith((".", "/", "~")):
        raise LensError(f"Model path '{name}' does not exist; pass a model directory or hub name.")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = str(local) if local is not None else name
    if local is not None and local.is_dir() and not any(local.glob("*.safetensors")):
        if any(local.glob("*.bin")) or any(local.glob("*.pt")) or any(local.glob("*.pth")):
            # Pickle weights can carry code; only safetensors are read.
            raise LensError(
                f"Model folder '{name}' holds only pickle weights (.bin/.pt), which are not "
                "loaded because a pickle can run code; convert them to safetensors "
                "(model.save_pretrained(dir, safe_serialization=True)) and use that folder."
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=revision,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=hf_attention(attn_implementation),
            device_map=device_map,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        # An empty folder or one without a model_type (ValueError), truncated or damaged
        # weights (SafetensorError/OSError), a missing hub name (OSError).
        raise LensError(
            f"Could not load model '{name}' ({_first_line(err)}); check the name or path, "
            "and that the folder holds a complete model (config.json and safetensors weights)."
        ) from None
    if device_map is None:
        model.to(torch_device)
    model.eval().requires_grad_(False)
    contiguous_head(model)
    tokenizer = load_tokenizer(name, revision, trust_remote_code)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        parts=find_parts(model),
        name=name,
        fingerprint=_fingerprint(model, local),
    )


def load_for_config(cfg: LensConfig, name: str | None = None) -> LoadedModel:
    """Load the model a config names (or `name`) with the config's device, dtype and options."""
    return load_model(
        name or cfg.model,
        cfg.device,
        cfg.model_dtype,
        cfg.revision,
        cfg.trust_remote_code,
        cfg.attn_implementation,
        device_map=cfg.device_map,
    )
