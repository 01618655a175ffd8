"""The context ceiling: an encoder trained on the true last T_text context tokens only, kept
beside a lens in `<lens>/context_ceiling/` (docs/design.md section 7).

The lens's own E was trained mostly on D's texts, so E reading the true context (eval's
`context_tokens` row) is no fair reference for "the text says more than its input". The ceiling is
an E of the same shape (mode, LoRA rank, encoder layer and prompt) that only ever read the true
last T_text tokens ending at P: the warm start's E (saved by `train` when the warm start teaches
the context tokens) or one trained by `consistency-lens train-ceiling`. Only its trainable weights
are stored, through safetensors, beside a JSON config naming the base model's fingerprint, the
layer, the width, T_text and how it was trained; loading checks all of them and the checksum.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from consistency_lens.errors import LensError
from consistency_lens.models.adapter import find_parts
from consistency_lens.utils.io import atomic_write, atomic_write_json, read_json, sha256_file

CEILING_DIR = "context_ceiling"
CEILING_CONFIG = "ceiling_config.json"
CEILING_WEIGHTS = "encoder.safetensors"
CEILING_FORMAT = 1
_ENCODER_PREFIX = "encoder."

# What must agree between a ceiling and the lens it sits beside: the same base model, activation
# and text length, and an E of the same shape (so the same weights fit).
_FIT_KEYS = ("fingerprint", "layer", "encoder_layer", "d_model", "t_text", "mode")
_SHAPE_KEYS = ("encoder_prompt", "lora_r", "lora_alpha")
# Settings of the run that trained the ceiling, recorded so a table can say what budget it had.
_TRAINED_KEYS = ("objective", "steps", "batch_size", "lr", "lr_blocks", "mse_weight")


def ceiling_dir(lens_dir: str | Path) -> Path:
    """Where the context ceiling of the lens at `lens_dir` lives."""
    return Path(lens_dir) / CEILING_DIR


def _lens_meta(lens_dir: Path) -> dict:
    from consistency_lens.models.lens import CONFIG_FILE

    return read_json(lens_dir / CONFIG_FILE, "Lens config")


def _shape(meta: dict) -> dict:
    """The fit and shape keys of a lens's `lens_config.json` (or a ceiling's config)."""
    train = meta.get("config", {}).get("train", {})
    out = {key: meta.get(key) for key in _FIT_KEYS}
    out.update({key: meta.get(key, train.get(key)) for key in _SHAPE_KEYS})
    return out


def _trained(meta: dict) -> dict:
    """How the lens in `meta` was trained: the settings that make a ceiling's budget."""
    cfg = meta.get("config", {})
    train = cfg.get("train", {})
    alpha = train.get("alpha", {})
    return {
        **{key: train.get(key) for key in _TRAINED_KEYS},
        "alpha": alpha.get("start") if isinstance(alpha, dict) else alpha,
        "corpus": cfg.get("corpus"),
        "train_samples": cfg.get("num_samples"),
        "seed": cfg.get("seed"),
    }


def ceiling_from_lens(source: str | Path, lens_dir: str | Path) -> Path:
    """Save the E of the saved lens at `source` (trained on true context tokens only) as the
    context ceiling of the lens at `lens_dir`; returns the ceiling directory."""
    from consistency_lens.models.lens import WEIGHTS_FILE

    source, lens_dir = Path(source), Path(lens_dir)
    src_meta, own_meta = _lens_meta(source), _lens_meta(lens_dir)
    src_shape, own_shape = _shape(src_meta), _shape(own_meta)
    if src_shape != own_shape:
        diff = sorted(k for k in own_shape if src_shape[k] != own_shape[k])
        raise LensError(
            f"The encoder of '{source}' does not fit the lens at '{lens_dir}' (they differ in "
            f"{', '.join(diff)}); train a ceiling for it with `consistency-lens train-ceiling "
            f"--checkpoint {lens_dir}`."
        )
    try:
        weights = load_file(str(source / WEIGHTS_FILE))
    except (FileNotFoundError, SafetensorError, OSError, ValueError):
        raise LensError(
            f"Lens weights '{source / WEIGHTS_FILE}' are missing or corrupt; save the lens again."
        ) from None
    state = {
        name[len(_ENCODER_PREFIX) :]: tensor.contiguous()
        for name, tensor in weights.items()
        if name.startswith(_ENCODER_PREFIX)
    }
    out = ceiling_dir(lens_dir)
    atomic_write(out / CEILING_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    # The config is written last and names the weights' checksum: a ceiling is complete only then.
    meta = {
        "format_version": CEILING_FORMAT,
        "base_model": own_meta.get("base_model"),
        **own_shape,
        "trained": _trained(src_meta),
        "weights_sha256": sha256_file(out / CEILING_WEIGHTS),
    }
    atomic_write_json(out / CEILING_CONFIG, meta)
    return out


def copy_ceiling(source: str | Path, lens_dir: str | Path) -> Path | None:
    """Copy the context ceiling of the saved lens at `source` beside the lens at `lens_dir` when
    it fits that lens (same base model, layer, width, T_text and E shape: the ceiling depends on
    none of the lens's weights) and is intact; returns the new ceiling directory, or None."""
    src = ceiling_dir(source)
    if not (src / CEILING_CONFIG).is_file():
        return None
    meta = read_json(src / CEILING_CONFIG, "Ceiling config")
    if not _intact(src, meta) or _shape(meta) != _shape(_lens_meta(Path(lens_dir))):
        return None
    out = ceiling_dir(lens_dir)
    data = (src / CEILING_WEIGHTS).read_bytes()
    atomic_write(out / CEILING_WEIGHTS, lambda tmp: tmp.write_bytes(data))
    # The config last, as ceiling_from_lens writes it: a ceiling is complete only then.
    atomic_write_json(out / CEILING_CONFIG, meta)
    return out


def _intact(path: Path, meta: dict) -> bool:
    """Whether the ceiling at `path` has its weights file, with the checksum its config names."""
    weights = path / CEILING_WEIGHTS
    return weights.is_file() and sha256_file(weights) == meta.get("weights_sha256")


def _check_ceiling(path: Path, meta: dict, lens) -> None:
    if meta.get("format_version") != CEILING_FORMAT:
        raise LensError(
            f"Ceiling config '{path / CEILING_CONFIG}' has format version "
            f"{meta.get('format_version')!r}, but this version reads {CEILING_FORMAT}; train the "
            f"ceiling again with `consistency-lens train-ceiling`."
        )
    train = lens.cfg.train
    expected = {
        "fingerprint": lens.loaded.fingerprint,
        "layer": lens.layer,
        "encoder_layer": lens.encoder.layer,
        "d_model": lens.d_model,
        "t_text": train.t_text,
        "mode": train.mode,
        "encoder_prompt": train.encoder_prompt,
        "lora_r": train.lora_r,
        "lora_alpha": train.lora_alpha,
    }
    diff = [key for key, value in expected.items() if meta.get(key) != value]
    if diff:
        raise LensError(
            f"The context ceiling at '{path}' does not fit its lens (it differs in "
            f"{', '.join(diff)}); delete it and train one with `consistency-lens train-ceiling`."
        )
    if not _intact(path, meta):
        raise LensError(
            f"Ceiling weights '{path / CEILING_WEIGHTS}' are missing or corrupt (checksum "
            f"mismatch); delete '{path}' and train it again with `consistency-lens train-ceiling`."
        )


def encoder_twin(encoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of E whose trainable weights are its own and whose frozen weights are shared."""
    shared = itertools.chain(encoder.parameters(), encoder.buffers())
    memo: dict[int, object] = {id(t): t for t in shared if not t.requires_grad}
    twin = copy.deepcopy(encoder, memo)
    # A compiled block's `forward` is a function closed over the original block (a deep copy
    # keeps functions as they are): the twin runs its own blocks eagerly instead.
    for block in find_parts(twin.model).blocks:
        forward = block.__dict__.get("forward")
        if forward is not None and not hasattr(forward, "__self__"):
            del block.forward
    return twin


def load_ceiling(lens, lens_dir: str | Path) -> tuple[torch.nn.Module, dict] | None:
    """The context ceiling beside the lens at `lens_dir` (an E twin with its weights, and its
    config), or None when the lens has none."""
    path = ceiling_dir(lens_dir)
    if not (path / CEILING_CONFIG).is_file():
        return None
    meta = read_json(path / CEILING_CONFIG, "Ceiling config")
    _check_ceiling(path, meta, lens)
    try:
        state = load_file(str(path / CEILING_WEIGHTS))
    except (SafetensorError, OSError, ValueError):
        raise LensError(
            f"Ceiling weights '{path / CEILING_WEIGHTS}' are corrupt; delete '{path}' and train "
            "it again with `consistency-lens train-ceiling`."
        ) from None
    twin = encoder_twin(lens.encoder)
    own = {name: p for name, p in twin.named_parameters() if p.requires_grad}
    if set(own) != set(state) or any(state[n].shape != p.shape for n, p in own.items()):
        raise LensError(
            f"Ceiling weights '{path / CEILING_WEIGHTS}' do not fit this lens's encoder; delete "
            f"'{path}' and train it again with `consistency-lens train-ceiling`."
        )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state[name].to(param.device))
    return twin, meta
