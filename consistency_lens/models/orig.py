"""The frozen original model M: logits at the last column after replacing block L's output there
(and, for `train.rl.next_reward`, at the positions after it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from consistency_lens.errors import LensError
from consistency_lens.models.adapter import check_layer, contiguous_head, find_parts
from consistency_lens.models.attention import grad_rows_kwargs, text_config
from consistency_lens.models.hooks import (
    capture_last,
    replace_at,
    replace_cells,
    replace_last,
    run_until,
)
from consistency_lens.models.inputs import (
    can_pack,
    causal_mask,
    no_logits,
    pack,
    position_ids,
    tile_cache,
)
from consistency_lens.models.loading import LoadedModel, hf_attention
from consistency_lens.models.patching import token_nll
from consistency_lens.utils.dist import resolve_device
from consistency_lens.utils.words import content_word_ids, first_content_token


def load_8bit(
    name: str,
    device: str = "cuda",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
) -> nn.Module:
    """Load `name` frozen in 8-bit with bitsandbytes (CUDA only)."""
    torch_device = resolve_device(device)
    if torch_device.type != "cuda":
        raise LensError(
            f"8-bit loading of the original model needs CUDA, but the device is '{torch_device}'; "
            "set distributed.orig_8bit=false."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LensError(
            "distributed.orig_8bit=true needs bitsandbytes; install it with "
            "`pip install consistency-lens[bitsandbytes]`."
        ) from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        name,
        revision=revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=hf_attention(attn_implementation),
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map={"": torch_device},
    )
    model.eval().requires_grad_(False)
    contiguous_head(model)
    return model


def _grad_rows(vectors_list: list[torch.Tensor], batch: int) -> tuple[int, int] | None:
    """The rows of the stacked vector sets that carry a gradient, where they are some of them in
    one run (the plan's [A, A_target]: A is data); None where all or none do, or they are apart.

    Only the vectors decide: M's weights never take a gradient (frozen in `__init__`, and a
    lens's LoRA adapters live in D's and E's copies), and its clean prefix runs without grad.
    """
    needs = [bool(v.requires_grad) for v in vectors_list]
    if all(needs) or not any(needs):
        return None
    first = needs.index(True)
    stop = len(needs) - needs[::-1].index(True)
    return (first * batch, stop * batch) if all(needs[first:stop]) else None


def _check_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, values: bool = True
) -> None:
    """Refuse ids and mask that are not one left-padded (B, T) batch; `values=False` checks the
    shapes only, leaving the last column unread (reading it is a host sync)."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise LensError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must be matching (B, T) tensors."
        )
    if values and not bool(attention_mask[:, -1].all()):
        raise LensError(
            "Every row's last column must be a real token (left padding puts P last); "
            "pad with consistency_lens.models.inputs.left_pad."
        )


@dataclass
class SharedPrefix:
    """One text's clean pass, run once: its token ids (1, n) and M's kv cache of tokens 0..n-2,
    from which every position's patched pass is read (`forward_at_positions`)."""

    input_ids: torch.Tensor
    cache: DynamicCache | None


class OriginalModelWrapper:
    """The frozen model M with a replacement of block `layer`'s output at the last column."""

    def __init__(self, loaded: LoadedModel, layer: int, model: nn.Module | None = None):
        self.loaded = loaded
        self.model = model if model is not None else loaded.model
        self.model.eval().requires_grad_(False)
        self.parts = find_parts(self.model)
        check_layer(self.parts, layer)
        self.layer = layer
        self.block = self.parts.blocks[layer]
        self._content_words: torch.Tensor | None = None

    @property
    def d_model(self) -> int:
        """Width of M's residual stream (the width of A)."""
        return self.parts.d_model

    @property
    def device(self) -> torch.device:
        """Device of M's input embedding."""
        return self.parts.embed.weight.device

    def content_word_ids(self) -> torch.Tensor:
        """(V,) for each row of M's output head, the id of its token's content word (-1: none;
        `utils.words.content_word_ids`), on M's device: built on the first call and kept, so a step
        or a decode compares integers; moved along when M has moved since."""
        if self._content_words is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._content_words = content_word_ids(self.loaded.tokenizer, vocab)
        if self._content_words.device != self.device:
            self._content_words = self._content_words.to(self.device)
        return self._content_words

    def _mask(self, attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
        """M's attention mask for a left-padded batch whose last `query_length` columns are read."""
        return causal_mask(
            attention_mask, query_length, self.model.config, self.parts.embed.weight.dtype
        )

    def _check_vectors(self, vectors_list: list[torch.Tensor], batch: int) -> None:
        if not vectors_list:
            raise LensError("A patched forward needs at least one set of vectors.")
        for vectors in vectors_list:
            if vectors.shape != (batch, self.d_model):
                raise LensError(
                    f"Replacement vectors have shape {tuple(vectors.shape)} but this model needs "
                    f"({batch}, {self.d_model}) (batch, d_model)."
                )

    def _prefix_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        repeats: int,
    ) -> DynamicCache | None:
        """M's kv cache of a left-padded batch's clean prefix 0..P-1 (positions from `positions`'
        first columns), stacked `repeats` times along the batch; None when P is each row's only
        column. The prefix never depends on the replacement at P, so it runs once, without grad."""
        if input_ids.shape[1] < 2:
            return None
        length = input_ids.shape[1] - 1
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(
                input_ids=input_ids[:, :-1],
                attention_mask=self._mask(attention_mask[:, :-1], length),
                position_ids=positions[:, :length],
                use_cache=True,
                **self.parts.cache_kwargs(cache),
                logits_to_keep=no_logits(),
            )
        return tile_cache(cache, repeats)

    def forward_with_replacement(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vectors_list: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Logits (B, V) at the last column for each set of replacement vectors, sharing the prefix.

        The batch must be left-padded (P last), as `left_pad` and `CollateFn` build it. This is the
        training step's call, so its last column is not read back to check it (a host sync that
        would stall an accelerator once per step); the other entry points of M check it.
        """
        _check_batch(input_ids, attention_mask, values=False)
        batch = input_ids.shape[0]
        self._check_vectors(vectors_list, batch)
        # The prefixes are packed: a batch whose rows all end at P = 0 has none to pack.
        if can_pack(self.model.config, input_ids.device, attention_mask[:, :-1]):
            return self._replaced_packed(input_ids, attention_mask, vectors_list)
        n = len(vectors_list)
        positions = position_ids(attention_mask)
        # All replacement sets go through one batched single-token pass (weights read once).
        cache = self._prefix_cache(input_ids, attention_mask, positions, n)
        vectors = torch.cat(vectors_list, dim=0)
        with replace_last(self.block, vectors):
            out = self.model(
                input_ids=input_ids[:, -1:].repeat(n, 1),
                attention_mask=self._mask(attention_mask.repeat(n, 1), 1),
                position_ids=positions[:, -1:].repeat(n, 1),
                use_cache=cache is not None,
                **self.parts.cache_kwargs(cache),
                **grad_rows_kwargs(self.model, _grad_rows(vectors_list, batch)),
                logits_to_keep=1,
            )
        return list(out.logits[:, -1].split(batch, dim=0))

    @torch.no_grad()
    def logits_after_replacement(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        next_ids: torch.Tensor,
        next_mask: torch.Tensor,
        vectors_list: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Logits (B, m, V) after P for each set of vectors written at P (no grad).

        M reads the tokens `next_ids` (B, m) that follow P (right-padded, `next_mask` 0 on
        padding) with block L's output at P replaced: what the state at P tells M's later
        predictions. P must be last, as in `forward_with_replacement`; like it, this is a training
        step's call, so the last column is not read back to check it. A padded column takes its
        row's last real position (never one past the model's range); its logits are not
        meaningful, and causal attention keeps it from the real positions before it.
        """
        _check_batch(input_ids, attention_mask, values=False)
        batch = input_ids.shape[0]
        if next_ids.dim() != 2 or next_ids.shape[0] != batch or next_ids.shape[1] < 1:
            raise LensError(
                f"next_ids {tuple(next_ids.shape)} must be (B, m) with B = {batch} and m >= 1."
            )
        if next_mask.shape != next_ids.shape:
            raise LensError(
                f"next_mask {tuple(next_mask.shape)} must match next_ids {tuple(next_ids.shape)}."
            )
        self._check_vectors(vectors_list, batch)
        n, m = len(vectors_list), next_ids.shape[1]
        device = input_ids.device
        next_ids, next_mask = next_ids.to(device), next_mask.to(device)
        full = torch.cat([attention_mask, next_mask.to(attention_mask.dtype)], dim=1)
        positions = position_ids(full)
        cache = self._prefix_cache(input_ids, attention_mask, positions, n)
        chunk = torch.cat([input_ids[:, -1:], next_ids], dim=1)
        # The chunk's first column is P: its state after block L is the one replaced.
        with replace_at(self.block, 0, torch.cat(vectors_list, dim=0)):
            out = self.model(
                input_ids=chunk.repeat(n, 1),
                attention_mask=self._mask(full.repeat(n, 1), m + 1),
                position_ids=positions[:, -(m + 1) :].repeat(n, 1),
                use_cache=cache is not None,
                **self.parts.cache_kwargs(cache),
                logits_to_keep=m,
            )
        return list(out.logits[:, -m:].split(batch, dim=0))

    def _replaced_packed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vectors_list: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """`forward_with_replacement` with the clean prefixes `pack`ed: no padding computed."""
        n, batch = len(vectors_list), input_ids.shape[0]
        packed = pack(
            input_ids[:, :-1],
            attention_mask[:, :-1],
            self.model.config,
            self.parts.embed.weight.dtype,
        )
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(
                **packed.first()[0],
                use_cache=True,
                **self.parts.cache_kwargs(cache),
                logits_to_keep=no_logits(),
            )
        at = packed.query_index(n)
        step = packed.step(input_ids[:, -1], repeats=n)
        with replace_cells(self.block, *at, torch.cat(vectors_list, dim=0)):
            out = self.model(
                **step,
                use_cache=True,
                **self.parts.cache_kwargs(cache),
                logits_to_keep=step["input_ids"].shape[1],
            )
        return list(out.logits[at].split(batch, dim=0))

    def shares_prefix(self, length: int) -> bool:
        """Whether a kv cache over a text of `length` tokens is exact (`forward_at_positions`,
        `greedy_continuation`): always, except under a sliding window shorter than the text (its
        window counts cache slots, not positions)."""
        window = getattr(text_config(self.model.config), "sliding_window", None)
        return window is None or length <= window

    @torch.no_grad()
    def shared_prefix(self, input_ids: torch.Tensor) -> SharedPrefix:
        """Run one text (1, n) once, without a replacement, keeping the kv cache of 0..n-2."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise LensError(f"shared_prefix reads one text (1, n), not {tuple(input_ids.shape)}.")
        if input_ids.shape[1] < 2:
            return SharedPrefix(input_ids, None)
        cache = DynamicCache(config=self.model.config)
        self.model(
            input_ids=input_ids[:, :-1],
            use_cache=True,
            **self.parts.cache_kwargs(cache),
            logits_to_keep=no_logits(),
        )
        return SharedPrefix(input_ids, cache)

    @torch.no_grad()
    def forward_at_positions(
        self, prefix: SharedPrefix, positions: list[int], vectors_list: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Logits (B, V) at each of `positions` of one text with block L's output there replaced,
        for each set of vectors (B = len(positions)): what `forward_with_replacement` gives for
        the left-padded prefixes 0..P, read from the text's one clean pass.

        Each row is token P alone at position P over the cache of 0..max(P)-1, whose columns P
        and later are masked out, so a text costs one clean pass plus one token per position
        instead of a prefix per position.
        """
        batch, n = len(positions), len(vectors_list)
        self._check_vectors(vectors_list, batch)
        if not self.shares_prefix(prefix.input_ids.shape[1]):
            raise LensError(
                "This model's sliding window is shorter than the text; use the padded path."
            )
        device = prefix.input_ids.device
        pos = torch.tensor(positions, device=device)
        upto = max(positions)
        cache = (
            None if prefix.cache is None or upto == 0 else tile_cache(prefix.cache, batch * n, upto)
        )
        cols = torch.arange(upto + 1, device=device)
        mask = ((cols < pos[:, None]) | (cols == upto)).long()
        with replace_last(self.block, torch.cat(vectors_list, dim=0)):
            out = self.model(
                input_ids=prefix.input_ids[0, pos].unsqueeze(1).repeat(n, 1),
                attention_mask=self._mask(mask.repeat(n, 1), 1),
                position_ids=pos.unsqueeze(1).repeat(n, 1),
                use_cache=cache is not None,
                **(self.parts.cache_kwargs(cache) if cache is not None else {}),
                logits_to_keep=1,
            )
        return list(out.logits[:, -1].split(batch, dim=0))

    def naive_forward_with_replacement(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vectors_list: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Reference: one full forward per sample and per vector set, no padding, no cache."""
        _check_batch(input_ids, attention_mask)
        self._check_vectors(vectors_list, input_ids.shape[0])
        results = []
        for vectors in vectors_list:
            rows = []
            for row in range(input_ids.shape[0]):
                ids = input_ids[row][attention_mask[row].bool()].unsqueeze(0)
                with replace_last(self.block, vectors[row : row + 1]):
                    rows.append(self.model(input_ids=ids).logits[0, -1])
            results.append(torch.stack(rows))
        return results

    @torch.no_grad()
    def clean_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        check_last: bool = True,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Unpatched logits (B, V) at the last column of a left-padded batch; `check_last=False`
        leaves the last column unread (for a training step: reading it is a host sync); `cache`,
        when given, is filled with the batch's kv cache."""
        _check_batch(input_ids, attention_mask, values=check_last)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask(attention_mask, input_ids.shape[1]),
            position_ids=position_ids(attention_mask),
            use_cache=cache is not None,
            **(self.parts.cache_kwargs(cache) if cache is not None else {}),
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    @torch.no_grad()
    def greedy_continuation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        k: int,
        first: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """M's `k` greedy next tokens (B, k) after the last column of a left-padded batch.

        `first`, when given, picks the first token from M's logits at the last column ((B, V) to
        (B,) ids) instead of their argmax; the later tokens are greedy after it. A warm-start step
        calls this, so, like `forward_with_replacement`, it does not read the last column back.
        """
        pick = first or (lambda logits: logits.argmax(-1))
        if can_pack(self.model.config, input_ids.device, attention_mask):
            return self._greedy_packed(input_ids, attention_mask, k, pick)
        return self._greedy_padded(input_ids, attention_mask, k, pick)

    def _greedy_padded(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        k: int,
        pick: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """`greedy_continuation` over the left-padded batch itself; its first pass is over the
        whole context, whose last column is each row's P."""
        if k > 1 and not self.shares_prefix(input_ids.shape[1] + k):
            return self._greedy_uncached(input_ids, attention_mask, k, pick)
        # The context runs once, keeping its kv cache; each later token is one column over it.
        # Appending a real column keeps the batch left-padded, so positions and masks extend.
        cache = DynamicCache(config=self.model.config) if k > 1 else None
        first = pick(self.clean_logits(input_ids, attention_mask, False, cache))
        tokens = [first.unsqueeze(-1).to(attention_mask.device)]
        position = position_ids(attention_mask)[:, -1:]
        for _ in range(k - 1):
            attention_mask = torch.cat([attention_mask, torch.ones_like(tokens[-1])], 1)
            position = position + 1
            out = self.model(
                input_ids=tokens[-1],
                attention_mask=self._mask(attention_mask, 1),
                position_ids=position,
                use_cache=True,
                **self.parts.cache_kwargs(cache),
                logits_to_keep=1,
            )
            # Under a device_map M's head may sit on another device than the embedding.
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True).to(attention_mask.device))
        return torch.cat(tokens, 1)

    def _greedy_packed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        k: int,
        pick: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """`greedy_continuation` over the batch's rows `pack`ed: no padding computed."""
        packed = pack(input_ids, attention_mask, self.model.config, self.parts.embed.weight.dtype)
        cache = DynamicCache(config=self.model.config)
        first, keep, index = packed.first()
        out = self.model(
            **first,
            use_cache=True,
            **self.parts.cache_kwargs(cache),
            logits_to_keep=keep,
        )
        tokens = [pick(out.logits[packed.pack, index])]
        for _ in range(k - 1):
            out = self.model(
                **packed.step(tokens[-1]),
                use_cache=True,
                **self.parts.cache_kwargs(cache),
                logits_to_keep=packed.slots,
            )
            tokens.append(out.logits[packed.query_index()].argmax(-1))
        return torch.stack(tokens, 1)

    def _greedy_uncached(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        k: int,
        first: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`greedy_continuation` re-reading the whole context for each token: the reference, and
        the path under a sliding window shorter than the text (its cache counts slots)."""
        tokens = []
        for i in range(k):
            logits = self.clean_logits(input_ids, attention_mask, False)
            token = (first(logits) if first and i == 0 else logits.argmax(-1)).unsqueeze(-1)
            # Under a device_map M's head may sit on another device than the embedding.
            token = token.to(input_ids.device)
            tokens.append(token)
            input_ids = torch.cat([input_ids, token], 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], 1)
        return torch.cat(tokens, 1)

    def first_pick(self, first: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The pick of M's first predicted token that `train.predict.first` names, as
        `greedy_continuation` takes it: None (M's argmax) for `greedy`, M's best-ranked content
        word among its top predictions (`first_content_token`) for `content`."""
        return first_content_token(self.content_word_ids()) if first == "content" else None

    @torch.no_grad()
    def continuation_and_activations(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        k: int,
        first: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`greedy_continuation` (B, k) and block L's output at the last column (B, d), taken from
        that continuation's own pass over the context: the dump stores both, running blocks 0..L
        once. Never packed: the dump's batches are grouped by P, so they hold little padding, and
        packing's wider attention would cost more than it saves (a quarter more on the demo's)."""
        pick = first or (lambda logits: logits.argmax(-1))
        with capture_last(self.block) as captured:
            tokens = self._greedy_padded(input_ids, attention_mask, k, pick)
        return tokens, captured[0]

    @torch.no_grad()
    def activations(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Block L's output (B, d) at the last column of a left-padded batch; later blocks skipped."""
        _check_batch(input_ids, attention_mask)
        hidden = run_until(
            self.model,
            self.block,
            input_ids=input_ids,
            attention_mask=self._mask(attention_mask, input_ids.shape[1]),
            position_ids=position_ids(attention_mask),
        )
        return hidden[:, -1]

    @property
    def bos_id(self) -> int:
        """The token a text is read after when its fluency is scored (BOS, else EOS, else pad)."""
        tok = self.loaded.tokenizer
        for tid in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
            if tid is not None:
                return int(tid)
        return 0

    @torch.no_grad()
    def text_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-sample mean NLL (nats per token) of texts `ids` (B, T) under M, read after `bos_id`.

        Every token of the text is scored; exp of its mean over samples is the eval's perplexity.
        The last token is scored, never read: M reads BOS and the others (a fifth less of M's
        work at four tokens, the same logits).
        """
        prefixed = torch.cat([torch.full_like(ids[:, :1], self.bos_id), ids[:, :-1]], dim=1)
        return token_nll(self.token_logits(prefixed), ids)

    @torch.no_grad()
    def token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of M reading unpadded token ids (the reference of `loss_lm`)."""
        return self.model(input_ids=input_ids).logits
