"""Lenses shipped inside the package, so that `explain` has a trained lens on first use, offline.

Each is a saved lens directory (`lens.safetensors`, `lens_config.json`, its training mean
`train_mean.safetensors`, its model card `README.md`, its `context_ceiling/`); BENCHMARKS.md
records how it was trained and its numbers, and `make demo` compares it with the demo's own lens on
the same samples.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent

SHIPPED = {"smollm2-135m": "smollm2-135m-sotu-pydoc-L20"}
"""Base model alias -> directory (under this package) of the lens shipped for it."""


def shipped_lens(model: str) -> Path | None:
    """The shipped lens directory for base model `model`, or None when none is shipped."""
    name = SHIPPED.get(model)
    if name is None or not (_HERE / name / "lens_config.json").is_file():
        return None
    return _HERE / name
