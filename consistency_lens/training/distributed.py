"""Multi-process training engines under `torchrun`: DDP, FSDP2 and DeepSpeed behind one `Engine`.

The trainer talks to one `Engine`; `wrap_for_strategy` picks it from `distributed.strategy`:

- `none`: one process, plain autograd and AdamW.
- `ddp`: DistributedDataParallel over the lens (frozen weights excluded), `no_sync` on all but the
  last micro-batch of a step, so gradients are all-reduced once per optimizer step.
- `fsdp`: FSDP2 `fully_shard` on E's blocks, then D, E and the lens; only trainable parameters are
  sharded (the frozen base stays replicated), bf16 compute with fp32 reduction on CUDA.
- `deepspeed`: `deepspeed.initialize` with ZeRO stage 1 or 2 from `distributed.deepspeed_config`.

Data: every rank walks the same (seed, epoch) permutation and takes its slice of each global batch,
so a step sees the same samples whatever the world size. Gumbel noise comes from per-rank seeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from consistency_lens.config import LensConfig
from consistency_lens.data.collate import Batch
from consistency_lens.errors import LensError
from consistency_lens.models.adapter import find_parts
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.training.objectives import Objective, ObjectiveOutput, StepInfo
from consistency_lens.training.optim import Ema, build_optimizer
from consistency_lens.utils.dist import rank_world


class LensStep(nn.Module):
    """The lens as one module whose forward is the training objective (what the engines wrap)."""

    def __init__(self, lens: ConsistencyLens):
        super().__init__()
        self.lens = lens

    def forward(self, batch: Batch, objective: Objective, step: StepInfo) -> ObjectiveOutput:
        """The objective's loss and terms of one micro-batch (the objective is the trainer's)."""
        return objective(self.lens, batch, step)


def _skipped_params(module: nn.Module) -> set[nn.Parameter]:
    # Frozen weights are identical on every rank (loaded from the same files) and empty
    # parameters (a prompt side with no tokens) never get a gradient; neither needs a collective.
    return {p for p in module.parameters() if not p.requires_grad or p.numel() == 0}


class Engine:
    """One optimizer step's mechanics for strategy `none`; subclasses add DDP, FSDP2, DeepSpeed."""

    sharded = False
    """Whether checkpoints are written collectively (torch.distributed.checkpoint / DeepSpeed)."""
    own_format: str | None = None
    """Name of the engine's own checkpoint files (DeepSpeed's), written by `write_own`."""

    def __init__(self, lens: ConsistencyLens, cfg: LensConfig, model: nn.Module):
        self.lens, self.cfg, self.model = lens, cfg, model
        self.optimizer, self.scheduler = build_optimizer(lens.param_groups(), cfg.train)

    def params(self) -> list[torch.Tensor]:
        """The parameters the optimizer updates."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def micro_batch(self, final: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward; `final` is the step's last one."""
        return contextlib.nullcontext()

    def agree(self, cause: str | None) -> str | None:
        """A skip cause when this rank or any other has one (ranks must skip together)."""
        return cause

    def zero_grad(self) -> None:
        """Forget the gradients of the previous step."""
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, averaged over the step's micro-batches."""
        (loss / self.cfg.train.grad_accum).backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm; return the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.params(), max_norm)

    def step(self) -> None:
        """Apply the accumulated gradients and advance the learning-rate schedule."""
        self.optimizer.step()
        self.scheduler.step()

    def gathered(self, ema: Ema | None = None) -> contextlib.AbstractContextManager:
        """Context in which the lens (and `ema`) hold full, unsharded weights: validation, saving."""
        return contextlib.nullcontext()

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank passed True (a collective: all ranks call it)."""
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=self.lens.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(int(flag))

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each float metric averaged over the ranks, whose slices of a batch are equal: the
        global batch's mean for a per-sample mean (a collective: all ranks call it). Integer
        metrics are counts the ranks agree on (`bad_batches`) and are kept as they are."""
        if not (dist.is_available() and dist.is_initialized()):
            return metrics
        means = {k: v for k, v in metrics.items() if not isinstance(v, int)}
        values = torch.tensor(list(means.values()), dtype=torch.float64, device=self.lens.device)
        dist.all_reduce(values)
        averaged = (values / dist.get_world_size()).tolist()
        return {**metrics, **dict(zip(means, averaged, strict=True))}

    def sharded_state(self, ema: Ema | None) -> dict:
        """The trainable weights, optimizer state and EMA as torch.distributed.checkpoint state."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(ignore_frozen_params=True)
        names = {n for n, p in self.lens.named_parameters() if p.requires_grad}
        model = get_model_state_dict(self.lens, options=options)
        state = {
            "model": {k: v for k, v in model.items() if k in names},
            "optim": get_optimizer_state_dict(self.lens, self.optimizer, options=options),
        }
        if ema is not None:
            state["ema"] = ema.shadow
        return state

    def set_sharded_state(self, state: dict) -> None:
        """Load what `sharded_state` returned (after torch.distributed.checkpoint filled it)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(self.lens, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(self.lens, self.optimizer, state["optim"])

    def load_full(self, trainable: dict[str, torch.Tensor], optim: dict) -> None:
        """Full (unsharded) weights and an optimizer state of the single-process format."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.lens, trainable, options=full)
        # The single-process format keys optimizer state by position in the param groups;
        # the state-dict API wants parameter names. The groups are built in the same order.
        names = {id(p): n for n, p in self.lens.named_parameters()}
        order = [names[id(p)] for p in self.params()]
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optim["param_groups"]]
        by_name = {
            "state": {order[i]: s for i, s in optim["state"].items()},
            "param_groups": groups,
        }
        set_optimizer_state_dict(self.lens, self.optimizer, by_name, options=full)


class _Collective(Engine):
    """Base of the multi-process engines: ranks agree on skips and write checkpoints together."""

    sharded = True

    def agree(self, cause: str | None) -> str | None:
        """A skip cause when this rank or any other has one (ranks must skip together)."""
        flag = torch.tensor([cause is not None], dtype=torch.int32, device=self.lens.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return (cause or "a NaN/inf batch on another rank") if int(flag) else None


class DdpEngine(_Collective):
    """DistributedDataParallel over the trainable parameters of the lens."""

    def __init__(self, lens: ConsistencyLens, cfg: LensConfig):
        from torch.nn.parallel import DistributedDataParallel as DDP

        step = LensStep(lens)
        names = {id(p): n for n, p in step.named_parameters()}
        DDP._set_params_and_buffers_to_ignore_for_model(
            step, [names[id(p)] for p in _skipped_params(step)]
        )
        device = lens.device
        model = DDP(
            step,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Buffers (rotary tables, masks) are constants; broadcasting them each step is waste.
            broadcast_buffers=False,
        )
        super().__init__(lens, cfg, model)

    def micro_batch(self, final: bool) -> contextlib.AbstractContextManager:
        """All but the step's last micro-batch accumulate locally without an all-reduce."""
        return contextlib.nullcontext() if final else self.model.no_sync()


# The methods through which objectives run D and E besides `forward` (D's `generate` runs
# through `write`, which it calls).
_FSDP_ENTRY_POINTS = {
    "decoder": ("generate_soft", "teacher_forced_logits", "write"),
    "encoder": ("encode_ids",),
}


class FsdpEngine(_Collective):
    """FSDP2 `fully_shard` of E's blocks, then D, E and the lens (trainable weights only)."""

    def __init__(self, lens: ConsistencyLens, cfg: LensConfig):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        device = lens.device
        mesh = init_device_mesh(device.type, (rank_world()[1],))
        # bf16 compute with fp32 gradient reduction on CUDA; CPU keeps fp32 (no bf16 collectives
        # in gloo, and the tests compare against fp32 single-process training).
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        step = LensStep(lens)
        ignored = _skipped_params(step)

        def shard(module: nn.Module, reshard_after_forward: bool) -> None:
            if any(p not in ignored for p in module.parameters()):
                fully_shard(
                    module,
                    mesh=mesh,
                    mp_policy=mp,
                    ignored_params=ignored,
                    reshard_after_forward=reshard_after_forward,
                )

        # E: one FSDP unit per block, then E itself. D is one unit: its blocks run once per
        # generated token and get gradients through the KV cache, outside the block outputs
        # where FSDP hooks its backward all-gather, so D stays gathered from forward through
        # backward and is sharded at rest (parameters, gradients and optimizer state).
        for block in find_parts(lens.encoder.model).blocks:
            shard(block, reshard_after_forward=True)
        # `generate_soft` returns a dataclass, whose tensors FSDP cannot hook either.
        shard(lens.decoder, reshard_after_forward=False)
        shard(lens.encoder, reshard_after_forward=False)
        fully_shard(step, mesh=mesh, mp_policy=mp, ignored_params=ignored)
        # D and E run through methods other than `forward` (the objectives' entry points; D's
        # `generate` writes through `write`); FSDP must gather around each of them too.
        for part, methods in _FSDP_ENTRY_POINTS.items():
            module = getattr(lens, part)
            if hasattr(module, "unshard"):
                for method in methods:
                    register_fsdp_forward_method(module, method)
        super().__init__(lens, cfg, step)

    def micro_batch(self, final: bool) -> contextlib.AbstractContextManager:
        """All but the step's last micro-batch accumulate unreduced gradients."""
        self.model.set_requires_gradient_sync(final)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over all shards); return the norm before clipping."""
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(self.params(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    @contextlib.contextmanager
    def gathered(self, ema: Ema | None = None) -> Iterator[None]:
        """All-gather every FSDP unit (and the EMA), so plain (non-forward) calls see full weights."""
        from torch.distributed.fsdp import FSDPModule, fully_shard
        from torch.distributed.tensor import DTensor

        # The lens root must be FSDP's root before any block runs outside its forward, or each
        # block would initialise itself as a root (validation runs before the first step).
        fully_shard.state(self.model)._lazy_init()
        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        shards = ema.shadow if ema is not None else None
        if ema is not None:
            ema.shadow = {
                k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in shards.items()
            }
        try:
            yield
        finally:
            if ema is not None:
                ema.shadow = shards
            for unit in units:
                unit.reshard()


class DeepSpeedEngine(_Collective):
    """`deepspeed.initialize` (ZeRO 1/2) with the lens's param groups and learning-rate schedule."""

    own_format = "deepspeed"

    def __init__(self, lens: ConsistencyLens, cfg: LensConfig):
        try:
            import deepspeed
        except ImportError:
            raise LensError(
                "distributed.strategy=deepspeed needs deepspeed; install it with "
                "`pip install consistency-lens[deepspeed]`."
            ) from None
        ds_config = load_deepspeed_config(cfg, lens.device)
        self.lens, self.cfg = lens, cfg
        base, scheduler = build_optimizer(lens.param_groups(), cfg.train)
        optimizer = base
        if lens.device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam

            # DeepSpeed's fused Adam in AdamW mode over the same groups and learning rates.
            optimizer = FusedAdam(base.param_groups, adam_w_mode=True)
            scheduler = type(scheduler)(optimizer, scheduler.lr_lambdas[0])
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=LensStep(lens), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.model, self.optimizer, self.scheduler = engine, optimizer, scheduler

    def params(self) -> list[torch.Tensor]:
        """The parameters the optimizer updates."""
        return [p for p in self.lens.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients itself after each optimizer step."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward and DeepSpeed's `step()` of one micro-batch.

        DeepSpeed scales by the accumulation steps and counts micro-batches in `step()`: it
        reduces gradients and updates (optimizer and schedule) only when
        `(micro_steps + 1) % gradient_accumulation_steps == 0`, so `step()` must follow every
        micro-batch's backward, not only the last.
        """
        self.model.backward(loss)
        self.model.step()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """DeepSpeed clipped inside the last micro-batch's step (`gradient_clipping`).

        Returns the norm DeepSpeed measured; non-finite gradients are DeepSpeed's to skip
        (loss scaling in fp16), so a finite value is always returned.
        """
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else 0.0
        return torch.tensor(norm if np.isfinite(norm) else 0.0)

    def step(self) -> None:
        """Taken in `backward` at the accumulation boundary (optimizer and schedule together)."""

    def write_own(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint files (every rank its partition) under `directory`."""
        self.model.save_checkpoint(str(directory), tag=self.own_format, save_latest=False)

    def read_own(self, directory: Path) -> None:
        """Load what `write_own` wrote (the schedule comes from the lens's own state)."""
        self.model.load_checkpoint(
            str(directory), tag=self.own_format, load_lr_scheduler_states=False
        )


def load_deepspeed_config(cfg: LensConfig, device: torch.device) -> dict:
    """The DeepSpeed YAML as a dict, with batch, accumulation and clipping from the lens config."""
    path = Path(cfg.distributed.deepspeed_config)
    try:
        ds_config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise LensError(f"distributed.deepspeed_config '{path}' cannot be read ({err}).") from None
    if not isinstance(ds_config, dict):
        raise LensError(f"distributed.deepspeed_config '{path}' must hold a YAML mapping.")
    zero = ds_config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
    if str(stage) not in ("0", "1", "2"):
        # Stage 3 partitions every parameter between forwards, and D, E and M read theirs outside
        # one (D writes through `generate`, M's width is read off its embedding): it never ran.
        raise LensError(
            f"distributed.deepspeed_config '{path}' sets ZeRO stage {stage!r}, but the lens runs "
            "under stage 0, 1 or 2; set zero_optimization.stage to 2, or shard parameters with "
            "distributed.strategy=fsdp."
        )
    for key in ("optimizer", "scheduler"):
        if key in ds_config:
            raise LensError(
                f"distributed.deepspeed_config '{path}' sets '{key}', but the optimizer and its "
                "schedule come from train.lr, train.lr_blocks and train.lr_schedule; remove it."
            )
    ds_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds_config["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds_config["gradient_clipping"] = cfg.train.grad_clip or 0.0
    if device.type != "cuda":
        # CPU runs train in fp32, like the other strategies there.
        ds_config["bf16"] = {"enabled": False}
    return ds_config


def wrap_for_strategy(lens: ConsistencyLens, cfg: LensConfig) -> Engine:
    """The engine for `distributed.strategy` around a freshly built lens (after `setup`)."""
    strategy = cfg.distributed.strategy
    if strategy != "none" and not dist.is_initialized():
        raise LensError(
            f"distributed.strategy={strategy} needs a process group; launch with torchrun "
            "(or scripts/slurm.sh)."
        )
    if strategy == "ddp":
        return DdpEngine(lens, cfg)
    if strategy == "fsdp":
        return FsdpEngine(lens, cfg)
    if strategy == "deepspeed":
        return DeepSpeedEngine(lens, cfg)
    return Engine(lens, cfg, LensStep(lens))
