"""The one place that knows where a causal LM keeps its blocks and its token embeddings."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from consistency_lens.errors import LensError

# model_type -> (attribute path of the block list, attribute path of the base model)
FAMILIES: dict[str, tuple[str, str]] = {
    "gpt2": ("transformer.h", "transformer"),
    "llama": ("model.layers", "model"),
    "qwen2": ("model.layers", "model"),
    "qwen3": ("model.layers", "model"),
    "mistral": ("model.layers", "model"),
    "gemma": ("model.layers", "model"),
    "gemma2": ("model.layers", "model"),
    "gemma3_text": ("model.layers", "model"),
    "gemma3": ("model.language_model.layers", "model.language_model"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox"),
    "phi": ("model.layers", "model"),
    "phi3": ("model.layers", "model"),
}


def _get(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class _OneHotRows(torch.autograd.Function):
    """`onehots @ table` for rows one-hot in value: a gather forward, the matmul's gradients.

    The forward equals the matmul exactly: the one nonzero term is `hot * row` (the hot value of a
    straight-through one-hot is exactly 1), the others are exact zeros. Under autocast it
    returns the table's dtype, as `embed_ids` does, and its (rows, d) @ (d, V) backward runs in the
    autocast dtype, as the matmul's did.
    """

    @staticmethod
    def forward(ctx, onehots: torch.Tensor, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        hot = onehots.gather(-1, ids.unsqueeze(-1)).to(table.dtype)
        ctx.save_for_backward(ids, table, hot)
        ctx.onehot_dtype = onehots.dtype
        device = onehots.device.type
        ctx.autocast = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        )
        return table[ids] * hot

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        ids, table, hot = ctx.saved_tensors
        grad_onehots = grad_table = None
        flat = grad.reshape(-1, table.shape[1]).to(table.dtype)
        if ctx.needs_input_grad[0]:
            # Autocast is off in a custom backward: restore the forward's, or a bf16 run would
            # pay a full-precision vocabulary-sized matmul here.
            with torch.autocast(grad.device.type, ctx.autocast, enabled=ctx.autocast is not None):
                # 2-D: `(B, T, d) @ (d, V)` would broadcast the table into a batched copy.
                grad_onehots = flat @ table.T
            grad_onehots = grad_onehots.reshape(*ids.shape, table.shape[0]).to(ctx.onehot_dtype)
        if ctx.needs_input_grad[2]:
            rows = flat * hot.reshape(-1, 1)
            # The embedding's own backward: deterministic on CUDA, where index_add_ is not.
            grad_table = torch.ops.aten.embedding_dense_backward(
                rows, ids.reshape(-1), table.shape[0], -1, False
            )
        return grad_onehots, None, grad_table


@dataclass
class ModelParts:
    """Handles into a causal LM that the lens needs."""

    blocks: nn.ModuleList
    """The transformer blocks, in order."""
    embed: nn.Embedding
    """The input token embedding."""
    embed_scale: float
    """Factor the embedding module applies to its rows (Gemma 1/2/3 scale by sqrt(d) inside it)."""
    cache_arg: str = "past_key_values"
    """Name of the forward's KV-cache argument (`cache` from transformers 5.24 on)."""

    def cache_kwargs(self, cache: object) -> dict:
        """Forward kwargs that pass `cache`, under whichever name this transformers version uses."""
        return {self.cache_arg: cache}

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return self.embed.weight.shape[1]

    def embed_onehots(self, onehots: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs_embeds` for (..., V) rows that are one-hot in value, as `onehots @ table`.

        The straight-through one-hots D writes and E reads are exact one-hots forward, so the
        forward gathers each row's table row instead of multiplying by the whole (V, d) table;
        the backward is the matmul's (every vocabulary entry gets its gradient). `ids`, the hot
        index of each row, is the argmax of `onehots` when not given.
        """
        if ids is None:
            ids = onehots.argmax(dim=-1)
        return _OneHotRows.apply(onehots, ids, self.embed.weight) * self.embed_scale

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """`inputs_embeds` for token ids, exactly what the model's forward would compute."""
        return self.embed(ids)


def find_parts(model: nn.Module) -> ModelParts:
    """Locate blocks and embeddings of a supported HF causal LM, or say which families work."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise LensError(
            f"Model type '{model_type}' is not supported by the block adapter; "
            f"supported families: {supported}."
        )
    blocks = _get(model, FAMILIES[model_type][0])
    embed = model.get_input_embeddings()
    scale = getattr(embed, "embed_scale", 1.0)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    params = inspect.signature(base.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return ModelParts(blocks=blocks, embed=embed, embed_scale=float(scale), cache_arg=cache_arg)


def _contiguous_input(_module: nn.Module, args: tuple) -> tuple:
    hidden = args[0].contiguous()
    # A size-1 dimension keeps its old stride through `contiguous()` (it counts as contiguous), and
    # matmul's fold into one mm checks the strides themselves: a (1, 1, d) slice of a longer
    # sequence still took the batched path. Viewing through 2-D gives every dim its packed stride.
    return (hidden.view(-1, hidden.shape[-1]).view(hidden.shape), *args[1:])


def contiguous_head(model: nn.Module) -> None:
    """Make the vocabulary projection read a contiguous input (once per model).

    HF slices the hidden states before the head (`logits_to_keep`); on a (B, n, d) slice that is
    not contiguous (or is one row of a longer sequence), torch's CPU matmul falls back to a batched
    matmul that copies the whole (V, d) weight once per row, which cost most of a training step on
    the embedded model (and 75 ms per step for D's batch-1 pass over the prompt before the slot).
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_lens_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._lens_contiguous = True


def check_layer(parts: ModelParts, layer: int, what: str = "layer") -> None:
    """Refuse a block index outside the model."""
    if not 0 <= layer < parts.num_blocks:
        raise LensError(
            f"{what}={layer} is out of range: this model has {parts.num_blocks} blocks, "
            f"so use 0 <= {what} <= {parts.num_blocks - 1}."
        )
