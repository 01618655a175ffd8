"""A saved lens's weights stored in another float dtype: bf16 halves a lens (and its context
ceiling) for sharing. Loading copies them into the lens's fp32 trainable weights, so only the
stored values are rounded. The card's numbers were computed on the old weights, so the card loses
its eval section and the lens its `eval_results.json` until `eval` and `card` run again (`card`
refuses the old results anyway: the weights' checksum changed)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from consistency_lens.errors import LensError
from consistency_lens.models.ceiling import CEILING_CONFIG, CEILING_WEIGHTS, ceiling_dir
from consistency_lens.models.hub import EVAL_RESULTS_FILE
from consistency_lens.models.lens import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    card_text,
    check_lens_dir,
)
from consistency_lens.utils.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_file,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Dtypes a lens's weights may be stored in."""


def _restore(weights: Path, config: Path, what: str, dtype: torch.dtype) -> bool:
    """Rewrite `weights` in `dtype` and the checksum `config` names; False when already so."""
    state = load_file(str(weights))
    if all(t.dtype == dtype for t in state.values()):
        return False
    if dtype == torch.float16:
        top = max((t.abs().max().item() for t in state.values() if t.numel()), default=0.0)
        if top > torch.finfo(torch.float16).max:
            raise LensError(
                f"{what} '{weights}' hold a value of {top:.3g}, beyond float16's range; "
                "store them as bfloat16 instead."
            )
    cast = {name: t.to(dtype).contiguous() for name, t in state.items()}
    atomic_write(weights, lambda tmp: save_file(cast, str(tmp)))
    # The config names the new checksum, written last as when the lens was saved.
    meta = read_json(config, f"{what} config")
    atomic_write_json(config, {**meta, "weights_sha256": sha256_file(weights)})
    return True


def store_weights_as(lens_dir: str | Path, dtype: str) -> list[Path]:
    """Store the saved lens at `lens_dir` (and its context ceiling, if any) in `dtype`; returns
    the weight files rewritten."""
    if dtype not in DTYPES:
        raise LensError(f"Unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}.")
    lens_dir = Path(lens_dir)
    check_lens_dir(lens_dir)
    targets = [(lens_dir / WEIGHTS_FILE, lens_dir / CONFIG_FILE, "Lens weights")]
    ceiling = ceiling_dir(lens_dir)
    if (ceiling / CEILING_CONFIG).is_file():
        meta = read_json(ceiling / CEILING_CONFIG, "Ceiling config")
        if sha256_file(ceiling / CEILING_WEIGHTS) != meta.get("weights_sha256"):
            raise LensError(
                f"Ceiling weights '{ceiling / CEILING_WEIGHTS}' are corrupt (checksum mismatch); "
                f"delete '{ceiling}' and train it again with `consistency-lens train-ceiling`."
            )
        targets.append((ceiling / CEILING_WEIGHTS, ceiling / CEILING_CONFIG, "Ceiling weights"))
    rewritten = [w for w, c, what in targets if _restore(w, c, what, DTYPES[dtype])]
    if rewritten:
        atomic_write_text(
            lens_dir / CARD_FILE, card_text(read_json(lens_dir / CONFIG_FILE, "Lens config"))
        )
        (lens_dir / EVAL_RESULTS_FILE).unlink(missing_ok=True)
    return rewritten
