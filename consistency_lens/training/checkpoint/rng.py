"""The random streams a checkpoint carries, as plain containers and tensors (weights_only-safe)."""

from __future__ import annotations

import random

import numpy as np
import torch

from consistency_lens.utils.dist import rank_seed, seed_all


def capture_rng() -> dict:
    """RNG states of python, numpy and torch as plain containers and tensors (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back RNG states saved by `capture_rng`."""
    random.setstate(_as_tuples(state["python"]))
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_or_reseed(rng: dict | None, seed: int, step: int) -> None:
    """Restore this rank's saved RNG states, or seed it afresh when the checkpoint has none."""
    # A rank that did not exist when the checkpoint was written gets a fresh stream from
    # (seed, rank, step); same-size resumes restore every rank's stream exactly.
    if rng is not None:
        restore_rng(rng)
    else:
        seed_all(rank_seed(seed) + 1_000_003 * step)


def _as_tuples(value: object) -> object:
    # random.setstate insists on tuples; keep them tuples even if a container became a list.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
