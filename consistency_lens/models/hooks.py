"""Forward hooks on a block: capture its output, stop the forward early, or replace a position."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _rebuild(output: object, hidden: torch.Tensor) -> object:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _StopForward(Exception):
    pass


def run_until(model: nn.Module, block: nn.Module, **forward_kwargs) -> torch.Tensor:
    """Run `model` only as far as `block` and return that block's output hidden states."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(_hidden(output))
        raise _StopForward

    # The handle removes the hook on leaving, whatever the forward raised.
    with block.register_forward_hook(hook):
        try:
            model(**forward_kwargs)
        except _StopForward:
            pass
    if not captured:
        raise RuntimeError("the forward pass never reached the hooked block")
    return captured[0]


@contextmanager
def capture_last(block: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Keep `block`'s output at the last position (B, d) of the first forward through it, in the
    list yielded (sliced in the hook, so a later block's in-place update cannot reach it)."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        if not captured:
            captured.append(_hidden(output)[:, -1].clone())

    with block.register_forward_hook(hook):
        yield captured


@contextmanager
def replace_last(block: nn.Module, vectors: torch.Tensor) -> Iterator[None]:
    """Overwrite `block`'s output at the last position with `vectors` (B, d), keeping gradients."""
    with replace_at(block, -1, vectors):
        yield


@contextmanager
def replace_at(block: nn.Module, index: int, vectors: torch.Tensor) -> Iterator[None]:
    """Overwrite `block`'s output at sequence position `index` with `vectors` (B, d), keeping gradients."""

    def hook(_module, _inputs, output):
        hidden = _hidden(output)
        pos = index % hidden.shape[1]
        new = vectors.to(hidden.dtype).unsqueeze(1)
        return _rebuild(output, torch.cat([hidden[:, :pos], new, hidden[:, pos + 1 :]], dim=1))

    with block.register_forward_hook(hook):
        yield


@contextmanager
def replace_cells(
    block: nn.Module, rows: torch.Tensor, cols: torch.Tensor, vectors: torch.Tensor
) -> Iterator[None]:
    """Overwrite `block`'s output at (rows[i], cols[i]) with vectors[i] (N, d), keeping gradients
    (a packed batch's positions P, `models.inputs.Packed`)."""

    def hook(_module, _inputs, output):
        hidden = _hidden(output)
        return _rebuild(output, hidden.index_put((rows, cols), vectors.to(hidden.dtype)))

    with block.register_forward_hook(hook):
        yield
