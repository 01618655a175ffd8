"""The decoder D: reads an activation through a soft prompt and writes text with Gumbel-Softmax + STE."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedTokenizerBase

from consistency_lens.errors import LensError
from consistency_lens.models.adapter import check_layer, find_parts
from consistency_lens.models.attention import grad_rows_kwargs
from consistency_lens.models.hooks import replace_at
from consistency_lens.models.inputs import no_logits
from consistency_lens.models.projection import near_identity

EMBED_SLOT = "<embed>"
# With `inject_layer` set, the slot holds this token and A replaces its state after block k.
PLACEHOLDER = " X"

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SoftGeneration:
    """What `generate_soft` returns; index t is the t-th generated token."""

    token_logits: torch.Tensor
    """(B, T, V) the logits that produced token t (before Gumbel noise)."""
    discrete_token_ids: torch.Tensor
    """(B, T) the sampled tokens."""
    ste_onehots: torch.Tensor
    """(B, T, V) hard one-hots whose gradient is the Gumbel-Softmax's (what E consumes)."""


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise (float32) shaped like `like`: `-log(-log U)`, U uniform in [0, 1).

    U = 0 gives -inf, a token that cannot be drawn. Drawn from uniforms because torch's CPU
    `exponential_` (what `F.gumbel_softmax` uses) takes 6x as long, ~17 ms per (16, 49152) draw;
    in float32 whatever `like`'s dtype, since a bf16 U would cap the noise near 5.5.
    """
    uniform = torch.rand(like.shape, device=like.device, dtype=torch.float32, generator=generator)
    return uniform.log_().neg_().log_().neg_()


class _StraightThrough(torch.autograd.Function):
    """Forward: the one-hots of `ids`, shaped like `soft`; backward: `soft`'s gradient as is.

    What `hard - soft.detach() + soft` computes, without its two passes over (B, V) each way,
    and with one-hots that are exact (1 - s + s need not round back to 1).
    """

    @staticmethod
    def forward(ctx, soft: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(soft).scatter_(-1, ids.unsqueeze(-1), 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def gumbel_softmax_hard(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through Gumbel-Softmax over the last dim: (hard one-hots, their token ids).

    The one-hots are exact in value; their gradient is that of softmax((logits + g) / tau).
    """
    soft = F.softmax((logits + gumbel_noise(logits)) / tau, dim=-1)
    ids = soft.argmax(dim=-1)
    return _StraightThrough.apply(soft, ids), ids


def sample_ids(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Token ids drawn from softmax(logits / temperature) over the last dim (Gumbel-max).

    Unlike `torch.multinomial`, nothing is read back to check the probabilities (a host read).
    With `generator`, one row of noise is drawn from it and shared by every row of `logits`: each
    row's draw then depends on its own logits and the generator alone, not on its batch.
    """
    scaled = logits.float() / temperature
    like = scaled if generator is None else scaled[..., :1, :]
    return (scaled + gumbel_noise(like, generator)).argmax(dim=-1)


def split_prompt(prompt: str) -> tuple[str, str]:
    """Text before and after the single `<embed>` slot of a decoder prompt."""
    if prompt.count(EMBED_SLOT) != 1:
        raise LensError(
            f"train.prompt must contain '{EMBED_SLOT}' exactly once (got {prompt!r}); it marks "
            "where the projected activation goes."
        )
    left, right = prompt.split(EMBED_SLOT)
    return left, right


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt before (with the tokenizer's BOS, if any) and after the slot."""
    left, right = split_prompt(prompt)
    left_ids = tokenizer(left, add_special_tokens=True)["input_ids"]
    right_ids = tokenizer(right, add_special_tokens=False)["input_ids"] if right else []
    return list(left_ids), list(right_ids)


def placeholder_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token an `inject_layer` slot holds before A overwrites its state (`PLACEHOLDER`'s first)."""
    return tokenizer(PLACEHOLDER, add_special_tokens=False)["input_ids"][0]


class DecoderModel(nn.Module):
    """D: `prompt_left + Proj_A_to_D_emb(A) + prompt_right`, then `T_text` generated tokens."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompt: str,
        d_activation: int,
        proj_scale: float,
        gradient_checkpointing: bool = False,
        inject_layer: int | None = None,
        rotate: int = 0,
    ):
        """`rotate`: D writes the text's last `rotate` tokens first (`train.decoder_rotate`);
        `generate` and `teacher_forced_logits` take and give texts in reading order."""
        super().__init__()
        self.model = model
        self.rotate = rotate
        self.parts = find_parts(model)
        left_ids, right_ids = prompt_token_ids(tokenizer, prompt)
        device = self.parts.embed.weight.device
        with torch.no_grad():
            # dtype=long: an empty prompt side (no BOS, nothing after <embed>) must stay an index tensor
            left_t = torch.tensor([left_ids], dtype=torch.long, device=device)
            right_t = torch.tensor([right_ids], dtype=torch.long, device=device)
            left = self.parts.embed_ids(left_t).float()[0]
            right = self.parts.embed_ids(right_t).float()[0]
        self.prompt_left = nn.Parameter(left)
        self.prompt_right = nn.Parameter(right)
        self.inject_layer = inject_layer
        self.slot: nn.Parameter | None = None
        if inject_layer is not None:
            check_layer(self.parts, inject_layer, "train.inject_layer")
            # The slot's input is an ordinary token (trainable); A overwrites its state after block k.
            with torch.no_grad():
                slot_t = torch.tensor(
                    [[placeholder_id(tokenizer)]], dtype=torch.long, device=device
                )
                self.slot = nn.Parameter(self.parts.embed_ids(slot_t).float()[0])
        self.proj = near_identity(d_activation, self.parts.d_model, proj_scale).to(device)
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def _dtype(self) -> torch.dtype:
        return self.parts.embed.weight.dtype

    def _step(
        self,
        embeds: torch.Tensor,
        kv: KV,
        inject: torch.Tensor | None = None,
        keep: int = 1,
        grad_rows: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """Run `embeds` (B, n, d) after the cached `kv`; return the last `keep` logits and the kv
        of all positions so far.

        `inject` (B, d) overwrites the state of `embeds`' first position after block
        `inject_layer`. Only rows `grad_rows` (start, stop), if given, keep attention's graph
        (`models/attention.py`). The step is a pure function of its tensor inputs so that it can be
        recomputed in backward (gradient checkpointing, hook included) and so that gradients flow
        through the cache to earlier steps. Logits are (B, V) for `keep == 1`, else (B, keep, V);
        `keep == 0` computes none (an empty (B, 0, V)).
        """

        def step(embeds: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
            flat = rest[1:] if inject is not None else rest
            pairs = list(zip(flat[0::2], flat[1::2], strict=True))
            # No config: every layer is a plain DynamicLayer that keeps all its states. A
            # sliding-window layer would crop what it stores to the window, and the kv read back
            # below would lose states; the model still applies each layer's window through its
            # attention mask.
            cache = DynamicCache(ddp_cache_data=pairs or None)
            hook = contextlib.nullcontext()
            if inject is not None:
                # Block outputs cover only the new positions, so the slot is index 0 of this chunk.
                hook = replace_at(self.parts.blocks[self.inject_layer], 0, rest[0])
            with hook:
                out = self.model(
                    inputs_embeds=embeds,
                    use_cache=True,
                    logits_to_keep=keep or no_logits(),
                    **self.parts.cache_kwargs(cache),
                    **grad_rows_kwargs(self.model, grad_rows),
                )
            # The cache grew by concatenation inside the forward: its tensors are the whole new kv.
            new = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            logits = out.logits[:, -1] if keep == 1 else out.logits[:, -keep:]
            return (logits, *new)

        flat = [t for pair in kv for t in pair]
        inputs = [inject, *flat] if inject is not None else flat
        if self.gradient_checkpointing and torch.is_grad_enabled():
            outputs = checkpoint(step, embeds, *inputs, use_reentrant=False)
        else:
            outputs = step(embeds, *inputs)
        logits, new_flat = outputs[0], outputs[1:]
        return logits, list(zip(new_flat[0::2], new_flat[1::2], strict=True))

    def _start(
        self,
        activations: torch.Tensor,
        extra: torch.Tensor | None = None,
        keep: int = 1,
        grad_rows: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """Run the prompt with the activations (and `extra` embeddings after it); return the last
        `keep` logits (the first is the first generated token's) and the KV cache."""
        if activations.dim() != 2 or activations.shape[1] != self.proj.in_features:
            raise LensError(
                f"Activations have shape {tuple(activations.shape)} but the decoder expects "
                f"(batch, {self.proj.in_features})."
            )
        batch = activations.shape[0]
        kv: KV = []
        if self.prompt_left.shape[0]:
            # The text before the slot is the same for every sample: run it once and broadcast.
            _, kv = self._step(self.prompt_left.unsqueeze(0).to(self._dtype), [], keep=0)
            kv = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
        right = self.prompt_right.unsqueeze(0).expand(batch, -1, -1)
        tail = [right] if extra is None else [right, extra.to(right.dtype)]
        projected = self.proj(activations.float())
        if self.slot is None:
            embeds = torch.cat([projected.unsqueeze(1), *tail], dim=1)
            return self._step(embeds.to(self._dtype), kv, keep=keep, grad_rows=grad_rows)
        slot = self.slot.unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([slot, *tail], dim=1)
        return self._step(
            embeds.to(self._dtype), kv, inject=projected, keep=keep, grad_rows=grad_rows
        )

    def _start_rows(
        self, activations: torch.Tensor, rows: torch.Tensor | None, cache: bool = True
    ) -> tuple[torch.Tensor, KV]:
        """`_start` once per activation, then its first logits and KV cache for text n taken
        from row `rows[n]` (all rows, in order, without `rows`); without `cache`, no KV cache
        (a one-token text needs none, and selecting it would copy every layer's)."""
        logits, kv = self._start(activations)
        if rows is None:
            return logits, kv
        rows = rows.to(logits.device)
        kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv] if cache else []
        return logits.index_select(0, rows), kv

    def teacher_forced_logits(
        self, activations: torch.Tensor, target_ids: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (N, T, V) with which D would write `target_ids` (N, T), in one forward pass;
        column t scores target token t (in reading order, whatever order D writes in).

        With `rows`, text n is written from `activations[rows[n]]` and the prompt and A run once
        per activation (then the texts over their cache), as in `write`."""
        length = target_ids.shape[1]
        written = target_ids.roll(self.rotate, dims=1) if self.rotate else target_ids
        extra = self.parts.embed_ids(written[:, :-1]) if length > 1 else None
        if rows is None:
            logits, _ = self._start(activations, extra, keep=length)
            logits = logits if length > 1 else logits.unsqueeze(1)
        else:
            first, kv = self._start_rows(activations, rows, cache=extra is not None)
            logits = first.unsqueeze(1)
            if extra is not None:
                rest, _ = self._step(extra, kv, keep=length - 1)
                logits = torch.cat([logits, rest if length > 2 else rest.unsqueeze(1)], 1)
        return logits.roll(-self.rotate, dims=1) if self.rotate else logits

    def generate_soft(
        self,
        activations: torch.Tensor,
        max_length: int,
        tau: float,
        grad_rows: tuple[int, int] | None = None,
    ) -> SoftGeneration:
        """Differentiable generation of `max_length` tokens (Gumbel-Softmax, hard, STE), KV-cached.

        `grad_rows` (start, stop): the only rows whose outputs any loss differentiates; the others'
        attention runs without autograd (same values, a cheaper backward).
        """
        if self.rotate:
            # Its outputs are indexed in written order; the plan objective reads them as read.
            raise LensError(
                f"generate_soft writes in D's own order; it cannot serve a decoder with "
                f"train.decoder_rotate={self.rotate}: set train.decoder_rotate=0."
            )
        logits, kv = self._start(activations, grad_rows=grad_rows)
        all_logits, all_ids, all_onehots = [], [], []
        for t in range(max_length):
            onehot, ids = gumbel_softmax_hard(logits.float(), tau)
            all_logits.append(logits)
            all_ids.append(ids)
            all_onehots.append(onehot)
            if t + 1 < max_length:
                embeds = self.parts.embed_onehots(onehot, ids).unsqueeze(1)
                logits, kv = self._step(embeds, kv, grad_rows=grad_rows)
        return SoftGeneration(
            token_logits=torch.stack(all_logits, dim=1),
            discrete_token_ids=torch.stack(all_ids, dim=1),
            ste_onehots=torch.stack(all_onehots, dim=1),
        )

    @torch.no_grad()
    def write(
        self,
        activations: torch.Tensor,
        max_length: int,
        choose: Callable[[int, torch.Tensor], torch.Tensor],
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (N, max_length) in reading order, each written token chosen by
        `choose(t, logits)` from D's logits (N, V) at written step t, and the mean log-probability
        per token D gave the tokens chosen (N,), read off the same logits (KV-cached).

        Text n is written from `activations[rows[n]]` (N = B without `rows`): the prompt and A
        run once per activation, not once per text written from it."""
        logits, kv = self._start_rows(activations, rows)
        ids, logprobs = [], []
        for t in range(max_length):
            next_ids = choose(t, logits).to(logits.device)
            picked = logits.float().gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
            logprobs.append(picked - logits.float().logsumexp(dim=-1))
            ids.append(next_ids)
            if t + 1 < max_length:
                logits, kv = self._step(self.parts.embed_ids(next_ids.unsqueeze(1)), kv)
        written = torch.stack(ids, dim=1)
        # D wrote the text's last `rotate` tokens first: move them back to the end.
        text = written.roll(-self.rotate, dims=1) if self.rotate else written
        return text, torch.stack(logprobs, dim=1).mean(dim=1)

    @torch.no_grad()
    def generate(
        self,
        activations: torch.Tensor,
        max_length: int,
        greedy: bool = True,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        first: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (N, max_length), greedy or sampled at `temperature`, in reading order
        (sampled with `generator`: one noise row per step shared by the batch, `sample_ids`).

        `first` (N,): the token D writes first, given instead of chosen; D continues from it.
        `rows`: text n is written from `activations[rows[n]]` (`write`)."""

        def choose(t: int, logits: torch.Tensor) -> torch.Tensor:
            if t == 0 and first is not None:
                return first
            if greedy:
                return logits.argmax(dim=-1)
            return sample_ids(logits, temperature, generator)

        return self.write(activations, max_length, choose, rows)[0]
