"""The encoder E: reads D's text (as STE one-hots) and rebuilds the activation from a block's output."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedTokenizerBase

from consistency_lens.errors import LensError
from consistency_lens.models.adapter import check_layer, find_parts
from consistency_lens.models.attention import grad_rows_kwargs
from consistency_lens.models.hooks import run_until
from consistency_lens.models.inputs import causal_mask, position_ids, tile_cache
from consistency_lens.models.projection import near_identity


def rotate_text(x: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`x` (B, T, ...) with the last `k` of each row's real tokens moved before the others.

    `mask` (B, T) marks real tokens, left-padded (the padding stays where it is); without it every
    token is real. A row with fewer than `k` real tokens is rotated by `k` modulo its length.
    """
    if k == 0:
        return x
    if mask is None:
        return x.roll(k, 1)
    mask = mask.long()  # a bool or float mask indexes as well
    t = x.shape[1]
    start = t - mask.sum(1, keepdim=True)  # (B, 1): the first real column
    cols = torch.arange(t, device=x.device).expand_as(mask)
    within = cols - start
    length = (t - start).clamp(min=1)
    src = torch.where(within >= 0, start + (within - k) % length, cols)
    return x.gather(1, src.view(*src.shape, *[1] * (x.dim() - 2)).expand_as(x))


class EncoderModel(nn.Module):
    """E: soft prompt + text (last `rotate` tokens first), block `layer`'s last state, projection."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        layer: int,
        d_activation: int,
        proj_scale: float,
        prompt: str = "",
        gradient_checkpointing: bool = False,
        rotate: int = 0,
    ):
        super().__init__()
        self.model = model
        self.parts = find_parts(model)
        check_layer(self.parts, layer, "train.encoder_layer")
        self.layer = layer
        device = self.parts.embed.weight.device
        self.prompt: nn.Parameter | None = None
        if prompt:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            with torch.no_grad():
                rows = self.parts.embed_ids(torch.tensor([ids], device=device)).float()[0]
            self.prompt = nn.Parameter(rows)
        self.proj = near_identity(self.parts.d_model, d_activation, proj_scale).to(device)
        self.gradient_checkpointing = gradient_checkpointing
        # `train.encoder_rotate`: how many of the text's last tokens E reads first.
        self.rotate = rotate

    def _read(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        grad_rows: tuple[int, int] | None = None,
        rotate: int | None = None,
    ) -> torch.Tensor:
        batch = embeds.shape[0]
        embeds = rotate_text(embeds, self.rotate if rotate is None else rotate, attention_mask)
        if attention_mask is None:
            # An explicit mask, even without padding: from none, transformers reads the positions
            # back to the host to look for packed sequences (a sync in every training step).
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if self.prompt is not None and not torch.is_grad_enabled():
            return self.proj(self._read_after_prompt(embeds, attention_mask).float())
        if self.prompt is not None:
            prompt = self.prompt.unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)
            embeds = torch.cat([prompt, embeds], dim=1)
            ones = attention_mask.new_ones(batch, prompt.shape[1])
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        mask = causal_mask(
            attention_mask, embeds.shape[1], self.model.config, self.parts.embed.weight.dtype
        )
        kwargs = {
            "use_cache": False,
            "attention_mask": mask,
            "position_ids": position_ids(attention_mask),
            **grad_rows_kwargs(self.model, grad_rows),
        }
        block = self.parts.blocks[self.layer]

        def read(embeds: torch.Tensor) -> torch.Tensor:
            # run_until stops after `block`: E never computes the blocks above its layer.
            return run_until(self.model, block, inputs_embeds=embeds, **kwargs)[:, -1]

        if self.gradient_checkpointing and torch.is_grad_enabled():
            hidden = checkpoint(read, embeds, use_reentrant=False)
        else:
            hidden = read(embeds)
        return self.proj(hidden.float())

    def _read_after_prompt(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Block L's state at the last column, as `_read` computes it, with the prompt run once
        for the batch and the texts over its kv cache (no gradient: the prompt is a parameter)."""
        block, length = self.parts.blocks[self.layer], self.prompt.shape[0]
        cache = DynamicCache(config=self.model.config)
        ones = attention_mask.new_ones(1, length)
        run_until(
            self.model,
            block,
            inputs_embeds=self.prompt.unsqueeze(0).to(embeds.dtype),
            # Explicit, as in `_read`: from none, transformers reads positions back to the host.
            attention_mask=causal_mask(
                ones, length, self.model.config, self.parts.embed.weight.dtype
            ),
            position_ids=position_ids(ones),
            use_cache=True,
            **self.parts.cache_kwargs(cache),
        )
        # Every layer up to L holds the prompt's kv (the forward stopped after block L).
        cache = tile_cache(cache, embeds.shape[0])
        full = torch.cat([attention_mask.new_ones(embeds.shape[0], length), attention_mask], 1)
        mask = causal_mask(full, embeds.shape[1], self.model.config, self.parts.embed.weight.dtype)
        hidden = run_until(
            self.model,
            block,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids(full)[:, length:],
            use_cache=True,
            **self.parts.cache_kwargs(cache),
        )
        return hidden[:, -1]

    def forward(
        self,
        onehots: torch.Tensor,
        ids: torch.Tensor | None = None,
        grad_rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Â (B, d_A) from (B, T, V) one-hots embedded with E's own table (gradients reach D);
        `ids` (B, T), their hot indices, save an argmax where the caller has them; only rows
        `grad_rows` (start, stop), if given, keep attention's graph (`models/attention.py`)."""
        if onehots.dim() != 3 or onehots.shape[-1] != self.parts.embed.weight.shape[0]:
            raise LensError(
                f"Encoder input has shape {tuple(onehots.shape)} but needs (batch, tokens, "
                f"{self.parts.embed.weight.shape[0]}) one-hots over the vocabulary."
            )
        return self._read(self.parts.embed_onehots(onehots, ids), None, grad_rows)

    def encode_ids(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotate: int | None = None,
    ) -> torch.Tensor:
        """Â (B, d_A) from token ids (B, T), left-padded when `attention_mask` is given; `rotate`
        overrides E's own (0: the true context, read in order, as the context rows read it)."""
        if ids.dim() != 2:
            raise LensError(f"Token ids have shape {tuple(ids.shape)} but need (batch, tokens).")
        return self._read(self.parts.embed_ids(ids), attention_mask, rotate=rotate)
