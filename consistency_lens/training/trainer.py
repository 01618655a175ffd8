"""`consistency-lens train`: train a lens on a dump, with validation, checkpoints and exact resume.

Determinism: everything is seeded from `cfg.seed`; the sample order of each epoch is a function of
(seed, epoch) and the data position is checkpointed, and the global RNG (which drives the Gumbel
noise) is saved and restored, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from consistency_lens.config import (
    LensConfig,
    ScheduleConfig,
    WarmStartConfig,
    config_from_dict,
    decode_settings,
    dump_config,
    saved_lens_config,
)
from consistency_lens.data.collate import Batch, CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.layout import METADATA, check_matches, check_same_dump, split_dir
from consistency_lens.data.stream import BatchStream
from consistency_lens.errors import LensError
from consistency_lens.models.ceiling import (
    CEILING_CONFIG,
    ceiling_dir,
    ceiling_from_lens,
    copy_ceiling,
)
from consistency_lens.models.lens import CONFIG_FILE, ConsistencyLens, saved_config
from consistency_lens.models.patching import fve, mse, patched_kl
from consistency_lens.training import checkpoint as ckpt
from consistency_lens.training.distributed import Engine, wrap_for_strategy
from consistency_lens.training.objectives import (
    Objective,
    StepInfo,
    build_objective,
    step_info,
)
from consistency_lens.training.optim import Ema
from consistency_lens.utils import dist
from consistency_lens.utils.io import read_json
from consistency_lens.utils.lock import dir_lock
from consistency_lens.utils.logging import RunLogger


@dataclass
class TrainState:
    """Counters a checkpoint carries besides weights, optimizer and RNG."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current pass over the train split."""
    batch_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed (the resume position)."""
    samples: int = 0
    """Samples that contributed to an optimizer step."""
    bad_batches: int = 0
    """Micro-batches skipped because of NaN/inf inputs, loss or gradients."""
    bad_streak: int = 0
    """Consecutive skipped micro-batches."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    """Directory of checkpoints, metrics.jsonl and the saved lens."""
    steps: int
    """Optimizer steps done."""
    lens_dir: Path
    """Where `save_pretrained` wrote the final lens."""
    bad_batches: int
    """Micro-batches skipped for NaN/inf."""
    last_val: dict = field(default_factory=dict)
    """Metrics of the last validation (empty without a val split)."""


@dataclass
class _Run:
    """Everything the loop needs."""

    cfg: LensConfig
    lens: ConsistencyLens
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: Ema | None
    stream: BatchStream
    val_set: ActivationDataset | None
    collate: CollateFn
    device: torch.device
    state: TrainState
    engine: Engine
    objective: Objective
    logger: RunLogger | None = None
    last_val: dict = field(default_factory=dict)


def _autocast(cfg: LensConfig, device: torch.device) -> contextlib.AbstractContextManager:
    precision = cfg.train.precision
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class TrainingStopped(LensError):
    """Training stopped by a signal after saving a checkpoint; names the command that resumes."""

    def __init__(self, signal_name: str, step: int, resume_command: str | None = None):
        self.signal_name, self.step = signal_name, step
        how = (
            f"continue with: {resume_command}"
            if resume_command
            else "run the same command with --resume to continue"
        )
        super().__init__(
            f"Stopped by {signal_name} at step {step} after saving a checkpoint; {how}."
        )


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """An event set by SIGTERM (e.g. Slurm preemption) or SIGINT (Ctrl-C); the loop checkpoints
    and stops on it. `flag.signal_name` says which signal came first.

    A second SIGINT interrupts at once (KeyboardInterrupt); checkpoints are atomic, so that
    leaves the previous one intact.
    """
    flag = threading.Event()
    flag.signal_name = None
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_signal(signum: int, frame: object) -> None:
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        # The name first: a reader that sees the flag set must also see which signal set it.
        flag.signal_name = flag.signal_name or signal.Signals(signum).name
        flag.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def load_splits(cfg: LensConfig) -> tuple[ActivationDataset, ActivationDataset | None]:
    """The dump's train split and its val split (None when the dump has no val split)."""
    where = (cfg.output_dir, cfg.model, cfg.layer, cfg.corpus)
    train_dir = split_dir(*where, "train")
    if not (train_dir / METADATA).is_file():
        raise LensError(
            f"No activation dump at '{train_dir}'; run `consistency-lens dump` with the same "
            "config (model, layer, corpus, output_dir) first."
        )
    val_dir = split_dir(*where, "val")
    val = ActivationDataset(val_dir, seed=cfg.seed) if (val_dir / METADATA).is_file() else None
    train = ActivationDataset(train_dir, seed=cfg.seed)
    if val is not None:
        check_same_dump(train, val)
    return train, val


def _bad_inputs(batch: Batch) -> str | None:
    for name in ("A", "A_prime"):
        if not bool(torch.isfinite(getattr(batch, name)).all()):
            return f"NaN/inf in the activations {name}"
    return None


def _skip_bad(run: _Run, cause: str) -> None:
    state, limit = run.state, run.cfg.train.max_bad_batches
    state.bad_batches += 1
    state.bad_streak += 1
    run.logger.warn(
        f"step {state.step + 1}: skipped a batch ({cause}); {state.bad_batches} skipped so far."
    )
    if state.bad_streak >= limit:
        raise LensError(
            f"Training stopped at step {state.step + 1}: {state.bad_streak} consecutive batches "
            f"were skipped, the last because of {cause}; check the dump for NaN/inf activations "
            "or lower train.lr."
        )


def _micro_step(run: _Run, batch: Batch, info: StepInfo, final: bool) -> dict | str:
    """Forward and backward one micro-batch: its detached losses, or a string naming the skip cause."""
    # Under torchrun all ranks skip together, or the collectives of forward/backward would hang.
    bad = run.engine.agree(_bad_inputs(batch))
    if bad is not None:
        return bad
    with run.engine.micro_batch(final):
        with _autocast(run.cfg, run.device):
            out = run.model(batch.to(run.device), run.objective, info)
        # Every term the objective returns is logged, declared or not (declared ones get curves).
        terms = {"loss": out.loss, **out.terms}
        # One read-back for the loss check and all the logged terms (not one per term).
        device = out.loss.device
        values = torch.stack(
            [v.detach().to(device, torch.float32).reshape(()) for v in terms.values()]
        ).tolist()
        bad = run.engine.agree(None if math.isfinite(values[0]) else "a NaN/inf loss")
        if bad is not None:
            return bad
        run.engine.backward(out.loss)
    # Only floats survive the micro-step, so no graph or activation outlives its backward.
    return dict(zip(terms, values, strict=True)) | {"n": len(batch)}


def _accumulate(run: _Run, info: StepInfo) -> list[dict]:
    outs: list[dict] = []
    while len(outs) < run.cfg.train.grad_accum:
        final = len(outs) + 1 == run.cfg.train.grad_accum
        out = _micro_step(run, run.stream.next(run.state), info, final)
        if isinstance(out, str):
            _skip_bad(run, out)
            continue
        run.state.bad_streak = 0
        outs.append(out)
    return outs


def _step_metrics(outs: list[dict], run: _Run, coeffs: dict[str, float]) -> dict:
    names = dict.fromkeys(key for o in outs for key in o if key != "n")
    metrics = {}
    for key in names:
        values = [o[key] for o in outs if key in o]
        metrics[key] = sum(values) / len(values)
    groups = run.optimizer.param_groups
    # `lr` is the first group's (projections/prompts); other groups are named after themselves.
    lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(groups[1:], start=1)}
    return {**metrics, **coeffs, "lr": groups[0]["lr"], **lrs}


def _train_step(run: _Run) -> dict:
    """One optimizer step (retried on fresh batches when the gradients are not finite)."""
    tcfg, step = run.cfg.train, run.state.step
    info = step_info(type(run.objective), run.cfg, step)
    while True:
        run.engine.zero_grad()
        outs = _accumulate(run, info)
        max_norm = tcfg.grad_clip if tcfg.grad_clip is not None else math.inf
        grad_norm = float(run.engine.clip_grad_norm(max_norm))  # the step's other read-back
        if math.isfinite(grad_norm):
            break
        _skip_bad(run, "NaN/inf gradients")
    metrics = _step_metrics(outs, run, info.coeffs)
    run.engine.step()
    if run.ema is not None:
        run.ema.update(run.lens.trainable_parameters())
    run.state.step += 1
    run.state.samples += sum(o["n"] for o in outs)
    return {**metrics, "grad_norm": grad_norm, "bad_batches": run.state.bad_batches}


def _val_loader(run: _Run) -> Iterator[Batch]:
    loader = DataLoader(
        run.val_set,
        batch_size=run.cfg.train.batch_size,
        collate_fn=run.collate,
        generator=torch.Generator(),
    )
    return islice(loader, run.cfg.train.val_batches)


@torch.no_grad()
def _val_pass(run: _Run) -> dict:
    acts, recons, kls = [], [], []
    # The objective's own terms on validation batches, under the names it logs in training.
    info = step_info(type(run.objective), run.cfg, run.state.step)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for batch in _val_loader(run):
        batch = batch.to(run.device)
        with _autocast(run.cfg, run.device):
            out = run.objective(run.lens, batch, info)
            for name, value in {"loss": out.loss, **out.terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(batch)
                counts[name] = counts.get(name, 0) + len(batch)
            a_hat = (
                out.a_hat if out.a_hat is not None else run.objective.reconstruct(run.lens, batch)
            )
            # The eval's direction, KL(M(A) || M(Â)), so curves and eval tables are one metric.
            (kl,) = patched_kl(
                run.lens.orig, batch.input_ids_A, batch.attention_mask_A, batch.A, [a_hat]
            )
        kls.append(kl.cpu())
        acts.append(batch.A.float().cpu())
        recons.append(a_hat.float().cpu())
    A, A_hat = torch.cat(acts), torch.cat(recons)
    return {
        "val_kl": float(torch.cat(kls).mean()),
        "val_mse": mse(A, A_hat),
        "val_fve": fve(A, A_hat),
        **{f"val_{name}": total / counts[name] for name, total in sums.items()},
    }


def validate(run: _Run) -> None:
    """KL of the objective's reconstruction (E reading D's explanation, or what the objective
    says), MSE and FVE on the first `val_batches` of the val split."""
    if run.val_set is None:
        return
    was_training = run.lens.training
    run.lens.eval()
    devices = [run.device] if run.device.type == "cuda" else []
    # Validation must not consume the training RNG, or its schedule would change the run.
    with torch.random.fork_rng(devices=devices, device_type=run.device.type), run.engine.gathered():
        metrics = _val_pass(run)
    run.lens.train(was_training)
    run.last_val = metrics
    run.logger.log(run.state.step, metrics, kind="val")
    run.logger.info(
        f"step {run.state.step}: val KL {metrics['val_kl']:.4f}  MSE {metrics['val_mse']:.4g}  "
        f"FVE {metrics['val_fve']:.4f}"
    )


def save(run: _Run) -> Path:
    """Checkpoint the run at its current step (collectively under ddp/fsdp/deepspeed)."""
    return ckpt.save_run(run.engine, run.cfg, run.state.step, asdict(run.state), run.ema)


def restore(run: _Run, path: Path) -> None:
    """Load weights, optimizer, scheduler, EMA, counters and RNG from a checkpoint directory."""
    run.state = TrainState(**ckpt.restore_run(run.engine, run.cfg, run.ema, path))


def _maybe_log(run: _Run, metrics: dict) -> None:
    step, tcfg = run.state.step, run.cfg.train
    run.logger.update(step, metrics)
    if step % tcfg.log_every == 0 or step == tcfg.steps:
        # Logged curves are the global batch's, whatever the number of ranks (one all-reduce per
        # logged step; the progress bar shows rank 0's slice in between).
        run.logger.log(step, run.engine.mean_over_ranks(metrics))


def _loop(run: _Run, stop: threading.Event) -> bool:
    """Train to `train.steps`; False when stopped early by SIGTERM (after checkpointing)."""
    tcfg = run.cfg.train
    if run.state.step == 0:
        validate(run)
    while run.state.step < tcfg.steps:
        start = time.perf_counter()
        metrics = _train_step(run)
        batch_samples = tcfg.batch_size * tcfg.grad_accum
        metrics["samples_per_s"] = batch_samples / max(time.perf_counter() - start, 1e-9)
        _maybe_log(run, metrics)
        step, last = run.state.step, run.state.step == tcfg.steps
        if step % tcfg.val_every == 0 or last:
            validate(run)
        # Read the flag once: a signal between two reads must not skip the save it asks for.
        # Ranks may see SIGTERM at different steps; all stop (and save collectively) together.
        own = (getattr(stop, "signal_name", None) or "SIGTERM") if stop.is_set() else None
        cause = run.engine.agree(own)
        stopping = cause is not None and not last
        if step % tcfg.ckpt_every == 0 or last or stopping:
            path = save(run)
        if stopping:
            run.logger.info(f"{cause}: saved checkpoint '{path}'.")
            return False
    return True


def _build_run(
    cfg: LensConfig, train_set: ActivationDataset, val_set: ActivationDataset | None
) -> _Run:
    dist.seed_all(cfg.seed)
    if cfg.train.init_from is not None:
        cfg = _with_starting_decode(cfg)
    lens = ConsistencyLens.build(cfg)
    if cfg.train.init_from is not None:
        # Before the engine and the objective: both see the starting weights (the objective's
        # reference D included); a resumed checkpoint replaces them afterwards.
        lens.init_from(cfg.train.init_from)
    for dataset in (train_set, val_set):
        if dataset is not None:
            check_matches(dataset, lens)
    engine = wrap_for_strategy(lens, cfg)
    dist.seed_ranks(cfg.seed)
    decay = cfg.train.ema_decay
    ema = Ema(lens.trainable_parameters(), decay) if decay is not None else None
    collate = CollateFn(pad_id=lens.loaded.pad_id)
    rank, world = dist.rank_world()
    # On a GPU the next batches are read in the background; on a CPU that would take a core
    # from the step itself.
    prefetch = lens.device.type == "cuda"
    stream = BatchStream(train_set, cfg.train.batch_size, cfg.seed, collate, rank, world, prefetch)
    return _Run(
        cfg,
        lens,
        engine.model,
        engine.optimizer,
        engine.scheduler,
        ema,
        stream,
        val_set,
        collate,
        lens.device,
        TrainState(),
        engine,
        _objective_for(lens, cfg, train_set, val_set),
    )


def _with_starting_decode(cfg: LensConfig) -> LensConfig:
    """`cfg` whose decode keys left unset come from the lens at `train.init_from`: a run started
    from a lens validates, trains (`encoder_refit`) and saves a lens that writes as that one did,
    unless the config or command line says otherwise."""
    lens_dir = Path(cfg.train.init_from)
    saved = saved_config(lens_dir, read_json(lens_dir / CONFIG_FILE, "Lens config"))
    return cfg.model_copy(update={"decode": decode_settings(saved, cfg)})


def _objective_for(
    lens: ConsistencyLens,
    cfg: LensConfig,
    train_set: ActivationDataset,
    val_set: ActivationDataset | None,
):
    """The run's objective; one that reads the tokens after P needs a dump that stores enough; one
    that reads M's stored continuation gets it from each split whose header has exactly its own
    (else it runs M for it)."""
    objective = build_objective(lens, cfg)
    for dataset in (train_set, val_set):
        if dataset is not None:
            dataset.read_predictions(objective.stored_predictions())
    stored = int(train_set.metadata.get("next_tokens", 0))
    needed = objective.next_tokens_needed()
    if stored < needed:
        raise LensError(
            f"Objective '{objective.name}' reads the {needed} corpus tokens after P, but the "
            f"dump at '{train_set.path}' stores {stored}; dump again with train.t_text={needed} "
            "(into another output_dir)."
        )
    return objective


def _save_final(run: _Run) -> Path:
    lens_dir = Path(run.cfg.train.run_dir) / "lens"
    # The lens carries its training mean, so eval's mean baseline needs no copy of this dump.
    run.lens.train_mean = run.stream.dataset.mean_activation()
    run.lens.save_pretrained(lens_dir)
    if run.ema is not None:
        current = run.lens.trainable_state_dict()  # already detached copies
        run.lens.load_trainable_state_dict(run.ema.state_dict())
        run.lens.save_pretrained(lens_dir.with_name("lens_ema"))
        run.lens.load_trainable_state_dict(current)
    return lens_dir


WARM_START_DIR = "warm_start"


def train(cfg: LensConfig, resume: bool = False) -> TrainResult:
    """Train a lens on the dump of `cfg`; `resume` continues from the latest valid checkpoint.

    With `train.warm_start.steps > 0` the warm start runs first (or resumes, or is reused when
    finished) in `<run_dir>/warm_start`, and the main objective starts from its lens. A lens
    started from `train.init_from` keeps that lens's context ceiling when it fits.
    """
    clean = False
    try:
        phase = _after_warm_start(cfg, resume) if cfg.train.warm_start.steps else cfg
        result = _train_phase(phase, resume)
        clean = True
    except TrainingStopped:
        clean = True  # every rank stopped at the same step
        raise
    finally:
        # One process group for both phases: under torchrun a group joined again after
        # `destroy_process_group` reads the agent's store, which still holds the first group's
        # addresses, and gloo then connects to ports closed since (most runs failed).
        dist.teardown(barrier=clean)
    # The process group is gone by now; torchrun's RANK says which process writes.
    if int(os.environ.get("RANK", "0")) == 0:
        keep_context_ceiling(cfg, result.lens_dir, resume)
    return result


def keep_context_ceiling(cfg: LensConfig, lens_dir: Path, resume: bool = False) -> Path | None:
    """Keep a context ceiling beside the lens at `lens_dir` when `cfg` has a warm start or starts
    from a lens; returns the ceiling directory, or None without one.

    A lens started from another (`train.init_from`, no warm start) keeps that one's ceiling when
    it fits (same T_text and E shape): the ceiling reads the true context, never the lens's
    weights.

    A warm start on the context tokens ending at P (`warm_start`) trained an E on exactly those
    tokens: that E is the ceiling (unless it read them rotated, `train.encoder_rotate`). Any other
    warm start (M's continuation, the next corpus tokens) never let its E read the context alone,
    in order, so a fresh E is trained on it with the warm start's budget (`train_ceiling`, in
    `<run_dir>/context_ceiling`): every warm-started lens is judged against the same kind of
    ceiling.
    """
    warm = cfg.train.warm_start
    if not warm.steps:
        init = cfg.train.init_from
        return None if init is None else copy_ceiling(init, lens_dir)
    if (ceiling_dir(lens_dir) / CEILING_CONFIG).is_file():
        return ceiling_dir(lens_dir)
    # A warm-start E that read the context rotated (`train.encoder_rotate`) is no ceiling, which
    # reads it in order: then one is trained like any other.
    if warm.objective == "warm_start" and not cfg.train.encoder_rotate:
        warm_lens = Path(cfg.train.run_dir) / WARM_START_DIR / "lens"
        return (
            ceiling_from_lens(warm_lens, lens_dir) if (warm_lens / CONFIG_FILE).is_file() else None
        )
    if cfg.distributed.strategy != "none":
        print(
            f"No context ceiling beside '{lens_dir}': its warm start ({warm.objective}) never "
            f"read the context alone; run `consistency-lens train-ceiling --checkpoint {lens_dir}` "
            "in one process."
        )
        return None
    budget = {"steps": warm.steps, "alpha": ScheduleConfig(kind="constant", start=warm.alpha)}
    ceiling_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=budget)})
    return train_ceiling(ceiling_cfg, lens_dir, resume)


CEILING_RUN_DIR = "context_ceiling"
# The settings that make an E's shape: the ceiling's must be the lens's, so its weights fit.
_E_SHAPE = (
    "mode",
    "t_text",
    "prompt",
    "inject_layer",
    "encoder_prompt",
    "encoder_layer",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
)


def train_ceiling(cfg: LensConfig, lens_dir: Path, resume: bool = False) -> Path:
    """Train an E of the lens's shape on the true last `t_text` context tokens only (objective
    `context_ceiling`, from a fresh E, on the dump of `cfg` with its `train` budget) in
    `<train.run_dir>/context_ceiling`, and keep it beside the lens at `lens_dir`; returns the
    ceiling directory."""
    lens_dir = Path(lens_dir)
    meta = read_json(lens_dir / CONFIG_FILE, "Lens config")
    if meta.get("base_model") != cfg.model:
        raise LensError(
            f"The lens at '{lens_dir}' was trained on base model '{meta.get('base_model')}' but "
            f"the config names model '{cfg.model}'; set model={meta.get('base_model')}."
        )
    if cfg.distributed.strategy != "none":
        raise LensError(
            "train-ceiling trains E alone in one process; set distributed.strategy=none."
        )
    own = saved_config(lens_dir, meta).train
    update = {key: getattr(own, key) for key in _E_SHAPE}
    update.update(
        objective="context_ceiling",
        encoder_rotate=0,
        decoder_rotate=0,
        run_dir=Path(cfg.train.run_dir) / CEILING_RUN_DIR,
        init_from=None,
        warm_start=WarmStartConfig(),
    )
    ceiling_cfg = cfg.model_copy(
        update={"layer": meta["layer"], "train": cfg.train.model_copy(update=update)}
    )
    result = _train_phase(ceiling_cfg, resume)
    return ceiling_from_lens(result.lens_dir, lens_dir)


def _after_warm_start(cfg: LensConfig, resume: bool) -> LensConfig:
    """Run (or reuse) the warm start of `cfg`; return `cfg` starting from its lens."""
    warm = cfg.train.warm_start
    if cfg.train.init_from is not None:
        raise LensError(
            "train.init_from and train.warm_start.steps both say where training starts; "
            "set one of them."
        )
    warm_dir = Path(cfg.train.run_dir) / WARM_START_DIR
    update = {
        "objective": warm.objective,
        "steps": warm.steps,
        "run_dir": warm_dir,
        "warm_start": warm.model_copy(update={"steps": 0}),
        "alpha": ScheduleConfig(kind="constant", start=warm.alpha),
    }
    warm_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})
    lens_config = warm_dir / "lens" / "lens_config.json"
    if not lens_config.is_file():
        _train_phase(warm_cfg, resume)
    else:
        saved = _settings(read_json(lens_config, "Lens config").get("config"))
        differ = _first_difference(saved, _settings(warm_cfg))
        if differ is not None:
            raise LensError(
                f"'{warm_dir}' holds a warm start trained with other settings ({differ} differs); "
                "delete it or use another train.run_dir."
            )
    return cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"init_from": warm_dir / "lens"})}
    )


def _settings(cfg: LensConfig | dict | None) -> dict | None:
    """A config as JSON without `device` (ranks of one job differ only there). A saved one is
    read through today's schema, so a moved key (`migrate_saved`) or a setting added since (at
    its default, which changes nothing) is no difference; one that no longer validates raises
    its own error rather than a misleading difference. Both sides compare as a lens saves its
    config (`saved_lens_config`), so an unset decode key and its default are no difference."""
    if cfg is None:
        return None
    data = saved_lens_config(config_from_dict(cfg) if isinstance(cfg, dict) else cfg)
    return {k: v for k, v in data.items() if k != "device"}


def _first_difference(saved: dict | None, ours: dict | None, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two dumped configs (None: equal)."""
    if saved == ours:
        return None
    if not (isinstance(saved, dict) and isinstance(ours, dict)):
        return prefix.rstrip(".") or "config"
    for key in [*saved, *(k for k in ours if k not in saved)]:
        differ = _first_difference(saved.get(key), ours.get(key), f"{prefix}{key}.")
        if differ is not None:
            return differ
    return prefix.rstrip(".") or "config"


def _train_phase(cfg: LensConfig, resume: bool) -> TrainResult:
    """One training run of `cfg.train.objective` in `cfg.train.run_dir`."""
    cfg = cfg.model_copy(update={"device": dist.setup(cfg.distributed.strategy, cfg.device)})
    run: _Run | None = None
    owner = contextlib.ExitStack()
    try:
        run_dir = Path(cfg.train.run_dir)
        _own_run_dir(run_dir, owner)
        resume_from = ckpt.checkpoint_to_resume(run_dir, resume)
        if resume_from is not None:
            # Before the dump and the model load: a changed setting is named, not a symptom of it.
            ckpt.check_resume_config(cfg, resume_from)
        train_set, val_set = load_splits(cfg)
        run = _build_run(cfg, train_set, val_set)
        if resume_from is not None:
            restore(run, resume_from)
        main = dist.rank_world()[0] == 0
        resume_step = run.state.step if resume_from is not None else None
        objective = type(run.objective)
        logger = RunLogger(
            run_dir,
            cfg.train.steps,
            resume_step,
            cfg.wandb,
            dump_config(cfg),
            main,
            shown=objective.loss_names()[:3] + objective.coefficients,
        )
        with logger, sigterm_flag() as stop:
            run.logger = logger
            if run.objective.stored_predictions() and not train_set.reads_predictions:
                logger.info(
                    f"The dump at '{train_set.path}' stores no continuation of M with this "
                    "train.predict, so each step runs M for it; a dump of this config into "
                    "another output_dir stores it."
                )
            if resume_from is not None:
                logger.info(f"Resuming from '{resume_from}' (step {run.state.step}).")
            elif resume:
                logger.info(f"No valid checkpoint in '{run_dir}'; starting from step 0.")
            finished = _loop(run, stop)
        lens_dir = run_dir / "lens"
        if finished:
            with run.engine.gathered(run.ema):
                lens_dir = _save_final(run) if main else lens_dir
        state = run.state
        result = TrainResult(run_dir, state.step, lens_dir, state.bad_batches, run.last_val)
    finally:
        # Also when the loop raises (e.g. too many bad batches): a DDP module that outlives its
        # process group aborts the interpreter at exit (`train` leaves the group afterwards).
        _drop_models(run)
        owner.close()
    if not finished:
        raise TrainingStopped(stop.signal_name or "SIGTERM", result.steps)
    return result


def _drop_models(run: _Run | None) -> None:
    """Let go of the run's models and optimizer state, so they are freed before the group is."""
    if run is not None:
        run.model = run.engine = run.lens = run.optimizer = run.scheduler = run.ema = None
    gc.collect()


def _own_run_dir(run_dir: Path, owner: contextlib.ExitStack) -> None:
    """Take `run_dir`'s exclusive lock (rank 0, for the whole job) or refuse; all ranks agree."""
    rank, world = dist.rank_world()
    error = None
    if rank == 0:
        try:
            owner.enter_context(dir_lock(run_dir, "run directory", "use another train.run_dir"))
        except LensError as err:
            error = str(err)
    if world > 1:
        # Every rank raises, or the others would wait forever in the first collective.
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise LensError(error)
