"""Attention whose backward covers only the batch rows that a loss differentiates.

The plan step runs A and A' through D and E as one batch, so that each block's weights are read
once for both, yet only A's rows carry a gradient: A' feeds a detached target. Autograd cannot
see that: `sdpa`'s backward costs as much for a row whose gradient is zero as for any other, and
on a CPU in bf16 it is the largest single cost of the step (`BENCHMARKS.md`). M's patched pass
is the same with A's rows, which need no gradient at all. So a caller names the rows that carry
one (`grad_rows`), and those go through attention with autograd and the others without it.
Attention computes every (row, head) on its own, so on a CPU with one intra-op thread each row's
result is the same bit for bit (tested). With more threads, and on a GPU, a kernel cuts its work
by the batch's size, and the order of its sums with it: the split then agrees to rounding.

transformers hands a model's extra forward keywords down to its attention function. Importing
this module wraps the `sdpa` entry of transformers' process-wide attention registry once: without
the keyword, where no input needs a gradient, or on a device where the split does not pay
(`SPLIT_DEVICES`: CPUs only), the wrapper is the plain `sdpa`. Only models whose attention is
`sdpa` get the keyword. The attention mask is the one per-row tensor that the supported families
hand to attention; it is split with the rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface

GRAD_ROWS = "lens_grad_rows"
"""The forward keyword that carries `(start, stop)`: the rows whose attention keeps its graph."""

SPLIT_DEVICES = frozenset({"cpu"})
"""Device types where the split pays. A CPU's bf16 attention backward has a fixed cost per (row,
head); a GPU kernel takes every row at once, so there the split would only add launches (two
attention calls, a concatenation and the slices' backward per block: +6% kernel launches in the
plan step, counted by `bench/step_ops.py`) to save a small share of the arithmetic."""


def text_config(config: object) -> object:
    """The language model's part of `config` (a multimodal model's text config), else `config`."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_implementation(config: object) -> str | None:
    """The attention implementation transformers runs for `config`'s language model."""
    return getattr(text_config(config), "_attn_implementation", None)


def grad_rows_kwargs(
    model: torch.nn.Module, grad_rows: tuple[int, int] | None
) -> dict[str, tuple[int, int]]:
    """The forward keywords that limit `model`'s attention graph to `grad_rows`, where it can."""
    if grad_rows is None or not torch.is_grad_enabled():
        return {}
    if attention_implementation(model.config) != "sdpa":
        return {}
    return {GRAD_ROWS: grad_rows}


def _batch_rows(tensor: torch.Tensor | None, lo: int, hi: int, batch: int) -> torch.Tensor | None:
    """Rows lo:hi of a per-row tensor; a mask broadcast over the batch is shared as it is."""
    if tensor is None or tensor.dim() == 0 or tensor.shape[0] != batch:
        return tensor
    return tensor[lo:hi]


def split_grad_rows(inner: Callable) -> Callable:
    """`inner` attention, run with autograd on the `GRAD_ROWS` rows only and without it elsewhere."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        rows = kwargs.pop(GRAD_ROWS, None)
        graphed = query.requires_grad or key.requires_grad or value.requires_grad
        # The device of each block's own inputs: under device_map blocks sit on several devices.
        pays = query.device.type in SPLIT_DEVICES
        if rows is None or not torch.is_grad_enabled() or not graphed or not pays:
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        batch = query.shape[0]
        start, stop = rows
        if key.shape[0] != batch or not 0 <= start < stop <= batch:
            raise ValueError(
                f"{GRAD_ROWS}={rows} must name rows of the batch of {batch} queries and keys "
                f"(keys have {key.shape[0]})."
            )
        outputs = []
        for lo, hi, grad in ((0, start, False), (start, stop, True), (stop, batch, False)):
            if hi <= lo:
                continue
            with torch.set_grad_enabled(grad):
                out, _ = inner(
                    module,
                    query[lo:hi],
                    key[lo:hi],
                    value[lo:hi],
                    _batch_rows(attention_mask, lo, hi, batch),
                    *args,
                    **kwargs,
                )
            outputs.append(out)
        return (torch.cat(outputs) if len(outputs) > 1 else outputs[0]), None

    attention.inner = inner
    return attention


def _install() -> None:
    """Wrap the registry's `sdpa` once (importing this module twice must not wrap it twice)."""
    current = AttentionInterface()["sdpa"]
    if getattr(current, "inner", None) is None:
        AttentionInterface.register("sdpa", split_grad_rows(current))


_install()
