"""Reinforcement learning on D's sampled text (GRPO-style), E trained by regression on the samples.

For each activation D samples `train.rl.samples` explanations. Each is scored by how well it lets E
rebuild A: reward = -KL(M(A) || M(E(text))) at P, optionally minus `rl.mse_reward` times E's
normalised squared error, `rl.next_reward` times the same KL at the positions after P (M reading
the true next tokens with E(text) at P), and `rl.fluency_reward` times the text's NLL under M (its
fluency; only the part above `rl.fluency_margin` when set), and
optionally plus `rl.prediction_reward` when the text names one of M's top-5 predictions at P (a
content word matched as the eval's specificity matches words).
Advantages are group-relative (each sample against the mean of the other samples of its
activation, optionally divided by the group's standard deviation), so no value network is needed.
D's loss is the policy gradient plus `rl.kl_ref` times the KL of D's token distributions to a
frozen reference D (the lens D started from: the warm-started one when
`train.init_from` is set), which keeps the text readable; with `rl.max_kl_ref`, a step whose KL is
past that bound drops the policy gradient and only pulls D back. E learns on the same samples by
MSE and by the KL at P, with the gradient flowing through its reconstruction only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from pydantic import Field, model_validator
from torch import nn

from consistency_lens.config import LensConfig, ObjectiveSettings
from consistency_lens.data.collate import Batch
from consistency_lens.errors import LensError
from consistency_lens.models.patching import kl_per_sample, patched_kl, patched_kl_after, token_nll
from consistency_lens.training.objectives import (
    Objective,
    ObjectiveOutput,
    StepInfo,
    normalised_mse,
    register,
)
from consistency_lens.utils.words import TOP_PREDICTIONS, names_prediction

NEXT_POSITIONS = 4
"""Positions after P that `rl.next_reward` reads when `rl.next_positions` is unset."""


class RLConfig(ObjectiveSettings):
    """Settings of `grpo`, under `train.rl`: sampling, rewards and the reference KL."""

    samples: int = Field(4, ge=2)
    """Explanations sampled per activation; advantages compare the samples of one activation."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of D."""
    kl_ref: float = Field(0.05, ge=0)
    """Weight of the KL of D's token distributions to the reference D (readability)."""
    mse_reward: float = Field(0.0, ge=0)
    """Reward is -KL at P minus this times E's normalised squared error."""
    fluency_reward: float = Field(0.0, ge=0)
    """Reward also minus this times the text's mean NLL per token under M (read after BOS)."""
    fluency_margin: float | None = Field(None, ge=0)
    """Mean NLL per token under M that a text may reach before it pays for fluency: the penalty
    is `fluency_reward * max(0, NLL - fluency_margin)`, so a text fluent enough competes on the
    KL alone (4.6 nats is perplexity 100). `None`: the whole NLL is paid for."""
    prediction_reward: float = Field(0.0, ge=0)
    """Reward also plus this when the text holds a content word of M's top-5 predictions at P
    under A (each token decoded alone and normalised, as the eval's top-5 bucket reads words)."""
    next_reward: float = Field(0.0, ge=0)
    """Reward also minus this times the mean KL(M(A) || M(E(text))) at the `next_positions`
    positions after P, M reading the corpus's true tokens there with E's reconstruction written
    at P: what the text carries of what M uses A for later, beyond its next token (needs a dump
    storing that many next tokens)."""
    next_positions: int | None = Field(None, ge=1)
    """Positions after P that `next_reward` reads (default `NEXT_POSITIONS`, 4)."""
    std_norm: bool = True
    """Divide each group's advantages by its reward standard deviation."""
    max_kl_ref: float | None = Field(None, gt=0)
    """A guard against divergence: on a micro-batch whose KL of D to its reference exceeds this
    (decided per process), D is trained on that KL alone (no policy gradient) until it is back
    under, as PPO stops its policy updates past a target KL. `None`: off."""

    @model_validator(mode="after")
    def _settings_take_effect(self) -> RLConfig:
        # A held step trains D on the reference KL alone: with weight 0, D would stay held.
        if self.max_kl_ref is not None and self.kl_ref == 0:
            raise ValueError(
                "train.rl.max_kl_ref needs train.rl.kl_ref above 0 (a held step trains D on the "
                "reference KL alone); set train.rl.kl_ref or unset train.rl.max_kl_ref."
            )
        # A margin only shapes the fluency penalty: without one it would silently do nothing.
        if self.fluency_margin is not None and self.fluency_reward == 0:
            raise ValueError(
                "train.rl.fluency_margin has no effect with train.rl.fluency_reward 0; set "
                "train.rl.fluency_reward or unset train.rl.fluency_margin."
            )
        if self.next_positions is not None and self.next_reward == 0:
            raise ValueError(
                "train.rl.next_positions has no effect with train.rl.next_reward 0; set "
                "train.rl.next_reward or unset train.rl.next_positions."
            )
        return self


def group_advantages(rewards: torch.Tensor, std_norm: bool) -> torch.Tensor:
    """Leave-one-out advantages of (B, K) rewards: r_i - mean_{j != i} r_j (/ group std)."""
    k = rewards.shape[1]
    if k < 2:
        raise LensError("train.rl.samples must be at least 2: advantages compare samples.")
    others = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    adv = rewards - others
    if std_norm:
        adv = adv / (rewards.std(1, keepdim=True) + 1e-6)
    return adv


def distinct_fraction(groups: torch.Tensor) -> torch.Tensor:
    """Distinct texts per group over all texts, for (n, K, T) token ids; computed on the device.

    A text counts when no earlier text of its group equals it (no read-back to the host).
    """
    k = groups.shape[1]
    same = (groups.unsqueeze(2) == groups.unsqueeze(1)).all(-1)  # (n, K, K): text i == text j
    earlier = torch.ones(k, k, dtype=torch.bool, device=groups.device).tril(-1)  # j < i
    return (~(same & earlier).any(-1)).float().mean()


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with fixed advantages: -mean(advantage * log pi(text))."""
    return -(advantages.detach() * logprobs).mean()


def reference_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) over the vocabulary, averaged over samples and token positions."""
    return kl_per_sample(logits, ref_logits).mean()


@contextlib.contextmanager
def swapped(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily let `params` hold `values` (their storage is swapped, nothing is copied).

    Autocast caches its low-precision copy of each parameter by tensor identity, which a swap
    keeps: without clearing that cache on the way in and out, a forward under bf16 autocast
    would run on whichever weights were cast first (the reference KL was then D against itself).
    """
    saved = {n: p.data for n, p in params.items()}
    torch.clear_autocast_cache()
    for n, p in params.items():
        p.data = _like(values[n], p)
    try:
        yield
    finally:
        torch.clear_autocast_cache()
        for n, p in params.items():
            p.data = saved[n]


def _like(value: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """`value` as `param` holds it now: under FSDP2 the reference is kept as this rank's shard
    (a DTensor) and gathered for a D that runs gathered, in its compute dtype (bf16 on CUDA)."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(param.data, DTensor):
            # FSDP2 gathers a sharded D from its own buffer, not from `.data`: the swap would be
            # ignored and the reference KL would read D against itself.
            raise RuntimeError("GRPO swaps its reference into D only while D is gathered.")
        if isinstance(value, DTensor):
            # Cast first: the gather then moves the compute dtype, not fp32.
            return value.to(param.dtype).full_tensor()
    return value.to(param.dtype)


@register("grpo")
class GRPOObjective(Objective):
    """`pg + rl.kl_ref * kl_ref + mse_weight * mse_e + alpha * kl_e` on K sampled texts each."""

    settings_class = RLConfig
    section = "rl"
    terms = ("pg", "kl_ref", "reward", "kl_e", "kl_next", "mse_e", "distinct", "named", "held")
    coefficients = ("alpha",)
    term_titles = {
        "pg": "Policy-gradient loss of D",
        "kl_ref": "KL of D to its reference",
        "reward": "Mean reward of D's samples (-KL at P, other rl.* terms included)",
        "kl_e": "KL at P with E(sampled text) patched in",
        "kl_next": "KL after P with E(sampled text) patched in at P (0 without rl.next_reward)",
        "mse_e": "E's normalised MSE",
        "distinct": "Distinct samples per activation (fraction)",
        "named": "Sampled texts naming a content word of M's top-5 at P (fraction)",
        "held": "Steps whose policy gradient the reference-KL guard dropped (fraction)",
        "alpha": "KL weight α",
    }
    linear_terms = ("pg", "reward", "distinct", "named", "held")

    def __init__(self, lens, cfg: LensConfig):
        super().__init__(lens, cfg)
        # The reference is D as built (after `train.init_from`, before any resumed checkpoint).
        self.reference = {n: p.detach().clone() for n, p in self._decoder_params(lens).items()}
        self.words = lens.orig.content_word_ids()

    def next_tokens_needed(self) -> int:
        """`rl.next_positions` (default `NEXT_POSITIONS`) with `rl.next_reward` on, else 0."""
        rl = self.settings
        return (rl.next_positions or NEXT_POSITIONS) if rl.next_reward else 0

    def _next_kl(
        self, lens, batch: Batch, a: torch.Tensor, sets: list[torch.Tensor]
    ) -> torch.Tensor:
        """(n, k) mean KL at the positions after P of each sampled text's reconstruction (no
        grad: it shapes D's reward only)."""
        want = self.next_tokens_needed()
        if batch.input_ids_next is None:
            # The trainer checks the dump when the run is built; a batch built by hand may lack them.
            raise LensError(
                f"train.rl.next_reward reads {want} corpus tokens after P, but this batch has "
                "none; train on a dump that stores them (train.t_text >= that many)."
            )
        # A batch whose rows all end sooner is narrower: every real token is within the slice.
        kls = patched_kl_after(
            lens.orig,
            batch.input_ids_A,
            batch.attention_mask_A,
            batch.input_ids_next[:, :want],
            batch.attention_mask_next[:, :want],
            a,
            [x.detach() for x in sets],
        )
        return torch.stack(kls, 1)

    @staticmethod
    def _decoder_params(lens) -> dict[str, nn.Parameter]:
        return {n: p for n, p in lens.decoder.named_parameters() if p.requires_grad}

    def __call__(self, lens, batch: Batch, step: StepInfo) -> ObjectiveOutput:
        """Sample, score, and return D's policy loss and E's regression loss."""
        rl = self.settings
        t_text, k = self.cfg.train.t_text, rl.samples
        a = batch.A.float()
        n = a.shape[0]
        # Text i*k + j is sample j of activation i; D reads each activation once for its k texts.
        rows = torch.arange(n, device=a.device).repeat_interleave(k)
        with torch.no_grad():
            ids = lens.decoder.generate(
                a, t_text, greedy=False, temperature=rl.temperature, rows=rows
            )
            with swapped(self._decoder_params(lens), self.reference):
                ref_logits = lens.decoder.teacher_forced_logits(a, ids, rows)

        a_hat = lens.encoder.encode_ids(ids)
        sets = list(a_hat.view(n, k, -1).unbind(1))
        kls, clean = patched_kl(
            lens.orig, batch.input_ids_A, batch.attention_mask_A, a, sets, return_clean=True
        )
        kls = torch.stack(kls, 1)  # (n, k), differentiable through Â
        top5 = clean.detach().topk(min(TOP_PREDICTIONS, clean.shape[-1]), dim=-1).indices
        # Under a device_map M's head (the logits) may sit on another device than its embedding.
        top5 = top5.to(self.words.device)
        named = names_prediction(self.words, ids.view(n, k, -1), top5)
        err = (a_hat.view(n, k, -1) - a.unsqueeze(1)).square().sum(-1) / a.square().sum(-1, True)
        penalty = kls + rl.mse_reward * err
        kl_next = kls.new_zeros(())  # a declared term: logged (as 0) with the reward off too
        if rl.next_reward:
            next_kls = self._next_kl(lens, batch, a, sets)
            kl_next = next_kls.mean()
            penalty = penalty + rl.next_reward * next_kls
        if rl.fluency_reward:
            nll = lens.orig.text_nll(ids).view(n, k)
            if rl.fluency_margin is not None:
                nll = (nll - rl.fluency_margin).clamp(min=0)
            penalty = penalty + rl.fluency_reward * nll
        rewards = -penalty.detach() + rl.prediction_reward * named.to(penalty.device)
        adv = group_advantages(rewards, rl.std_norm)

        logits = lens.decoder.teacher_forced_logits(a, ids, rows)
        # Mean log-probability per token of each sampled text under D.
        pg = policy_gradient_loss(-token_nll(logits, ids).view(n, k), adv)
        kl_ref = reference_kl(logits, ref_logits)
        # The guard is decided on the device (a Python branch would read the KL back).
        held = kl_ref.new_zeros(())  # a declared term: logged (as 0) with the guard off too
        kept = pg
        if rl.max_kl_ref is not None:
            held = (kl_ref.detach() > rl.max_kl_ref).float()
            # `where`, not a product: a held step drops the term even where it is not finite.
            kept = torch.where(held > 0, torch.zeros_like(pg), pg)
        kl_e = kls.mean()
        mse_e = normalised_mse(a_hat, a[rows])
        loss = kept + rl.kl_ref * kl_ref + self.cfg.train.mse_weight * mse_e + step["alpha"] * kl_e
        distinct = distinct_fraction(ids.view(n, k, -1))
        terms = {
            "pg": pg,
            "kl_ref": kl_ref,
            "reward": rewards.mean(),
            "kl_e": kl_e,
            "kl_next": kl_next,
            "mse_e": mse_e,
            "distinct": distinct,
            "named": named.mean(),
            "held": held,
        }
        return ObjectiveOutput(loss=loss, terms=terms)
