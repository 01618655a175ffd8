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

    def embed_rows(self, weights: torch.Tensor) -> torch.Tensor:
        """`inputs_embeds` for a (..., V) distribution over tokens (one-hot or soft)."""
        table = self.embed.weight
        # A 2-D matmul: `(B, T, V) @ (V, d)` would broadcast the table into a batched copy.
        flat = weights.reshape(-1, weights.shape[-1]).to(table.dtype) @ table
        return flat.reshape(*weights.shape[:-1], table.shape[1]) * self.embed_scale

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
    return (args[0].contiguous(), *args[1:])


def contiguous_head(model: nn.Module) -> None:
    """Make the vocabulary projection read a contiguous input (once per model).

    HF slices the hidden states before the head (`logits_to_keep`); on a (B, n, d) slice that is
    not contiguous, torch's CPU matmul falls back to a batched matmul that copies the whole
    (V, d) weight once per row, which cost most of a training step on the embedded model.
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
