"""Training checkpoints: atomic directories of safetensors + a weights-only state, with checksums.

Layout: `<run_dir>/checkpoints/step_<N>/` holding `trainable.safetensors` (never the frozen base),
`ema.safetensors` (when EMA is on), `state.pt` (optimizer, scheduler, RNG, data position,
counters; loaded only with `torch.load(weights_only=True)`), `config.json`, and `manifest.json`
(format version and the sha256 of every other file). A directory is written under a temporary
name and renamed into place, so a checkpoint is either complete or absent.

Multi-process runs (ddp/fsdp/deepspeed) write a *sharded* checkpoint in the same kind of directory:
the engine's own files (torch.distributed.checkpoint's `.metadata` and `*.distcp`, or DeepSpeed's
partitions), `state.pt` without weights, one `rng_<rank>.pt` per rank, `config.json`, and a
manifest with `"kind": "sharded"` over every file.

`save_run` and `restore_run` are the trainer's two calls; a resume maps between the formats and
world sizes where it can (DeepSpeed's own files resume only on the same number of ranks).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from consistency_lens.config import LensConfig, dump_config, weight_settings
from consistency_lens.errors import LensError
from consistency_lens.utils.dist import barrier, rank_seed, rank_world, seed_all
from consistency_lens.utils.io import (
    fsync_path,
    is_out_of_space,
    out_of_space_error,
    read_json,
    sha256_file,
)

if TYPE_CHECKING:
    from consistency_lens.training.distributed import Engine
    from consistency_lens.training.optim import Ema

FORMAT_VERSION = 1
"""Bumped whenever the meaning of a checkpoint's files changes."""

TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"
STATE = "state.pt"
CONFIG = "config.json"
MANIFEST = "manifest.json"
SHARDED = "sharded"
"""Manifest `kind` of a checkpoint written collectively by several ranks."""

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
log = logging.getLogger("consistency_lens")


@dataclass
class Checkpoint:
    """A verified checkpoint loaded into memory."""

    path: Path
    step: int
    trainable: dict[str, torch.Tensor]
    state: dict
    ema: dict[str, torch.Tensor] | None = None


def checkpoints_dir(run_dir: Path) -> Path:
    """The directory holding a run's `step_<N>` checkpoints."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """All `step_<N>` directories of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def capture_rng() -> dict:
    """RNG states of python, numpy and torch as plain containers and tensors (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back RNG states saved by `capture_rng`."""
    random.setstate(_as_tuples(state["python"]))
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: object) -> object:
    # random.setstate insists on tuples; keep them tuples even if a container became a list.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def _tensors_for_save(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a CPU clone is always acceptable.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _write_files(
    tmp: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    state: dict,
    config: dict,
    ema: dict[str, torch.Tensor] | None,
) -> None:
    save_file(_tensors_for_save(trainable), str(tmp / TRAINABLE))
    if ema is not None:
        save_file(_tensors_for_save(ema), str(tmp / EMA))
    _seal(tmp, step, state, config)


def _move_into_place(tmp: Path, final: Path) -> None:
    # A directory rename cannot replace a non-empty directory, so an existing one (a stale or
    # corrupt checkpoint of the same step) is moved aside first and deleted after the swap.
    old = None
    if final.exists():
        old = final.with_name(f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    state: dict,
    config: dict,
    ema: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write `step_<step>` atomically, then keep only the newest `keep` checkpoints up to `step`."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step_{step}-", dir=root))
    final = root / f"step_{step}"
    try:
        _write_files(tmp, step, trainable, state, config, ema)
        _move_into_place(tmp, final)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(err):
            raise out_of_space_error(final, "rerun with --resume") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, step, keep)
    return final


def prune_checkpoints(run_dir: Path, current_step: int, keep: int) -> None:
    """Delete leftovers of interrupted writes, checkpoints beyond `current_step`, and old ones."""
    root = checkpoints_dir(run_dir)
    for child in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(child, ignore_errors=True)
    # Checkpoints newer than the one just written belong to an abandoned trajectory (a resume
    # fell back past them because they were corrupt); keeping them would shadow the new ones.
    ckpts = list_checkpoints(run_dir)
    for step, path in ckpts:
        if step > current_step:
            shutil.rmtree(path, ignore_errors=True)
    current = [(s, p) for s, p in ckpts if s <= current_step]
    for _, path in current[: max(0, len(current) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError("manifest.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("manifest.json has no file list")
    return manifest


def _check_version(path: Path, version: object) -> None:
    if version != FORMAT_VERSION:
        raise LensError(
            f"Checkpoint '{path}' has format version {version!r} but this consistency-lens reads "
            f"version {FORMAT_VERSION}; use the matching consistency-lens version or start a new "
            "train.run_dir."
        )


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at `path` is unusable (missing/changed file), or None when intact.

    Raises LensError when it is intact but written in an incompatible format version.
    """
    try:
        manifest = _read_manifest(path)
    except ValueError as err:
        return str(err)
    _check_version(path, manifest.get("format_version"))
    files = manifest["files"]
    sharded = manifest.get("kind") == SHARDED
    for required in (STATE, CONFIG) if sharded else (TRAINABLE, STATE, CONFIG):
        if required not in files:
            return f"manifest.json does not list {required}"
    for name, digest in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != digest:
            return f"{name} does not match its sha256 checksum (truncated or modified)"
    return None


def latest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their checksums; corrupt ones are named and skipped."""
    for step, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("Skipping corrupt checkpoint '%s' (step %d): %s.", path, step, problem)
    return None


def load_state(path: Path) -> dict:
    """Load `state.pt` with `weights_only=True`; anything needing arbitrary code is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LensError(
            f"Refusing to load checkpoint state '{path}': it is not a plain tensor/state file "
            f"loadable with weights_only=True ({first}); delete that checkpoint directory."
        ) from None
    if not isinstance(state, dict):
        raise LensError(f"Checkpoint state '{path}' does not hold a dict; delete that checkpoint.")
    return state


def read_config(path: Path) -> dict:
    """The run config stored with a checkpoint."""
    return read_json(Path(path) / CONFIG, "Checkpoint config")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise LensError(f"Checkpoint file '{path}' is not valid safetensors ({err}).") from None


def _verified_state(path: Path) -> dict:
    """`state.pt` of a checkpoint whose checksums and format version check out."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise LensError(f"Checkpoint '{path}' is corrupt: {problem}.")
    state = load_state(path / STATE)
    _check_version(path, state.get("format_version"))
    return state


def load_checkpoint(path: Path) -> Checkpoint:
    """Verify and load a checkpoint directory."""
    path = Path(path)
    state = _verified_state(path)
    ema_path = path / EMA
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        trainable=_load_tensors(path / TRAINABLE),
        state=state,
        ema=_load_tensors(ema_path) if ema_path.is_file() else None,
    )


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint at `path` was written collectively (ddp/fsdp/deepspeed)."""
    try:
        return _read_manifest(Path(path)).get("kind") == SHARDED
    except ValueError:
        return False


def _rng_file(rank: int) -> str:
    return f"rng_{rank}.pt"


def _seal(tmp: Path, step: int, state: dict, config: dict, kind: str | None = None) -> None:
    """Write state, config and a manifest with the sha256 of every file below `tmp`; fsync all."""
    # Through a Python file, so that a full disk surfaces as an OSError chained to torch's error.
    with open(tmp / STATE, "wb") as handle:
        torch.save({**state, "format_version": FORMAT_VERSION, "step": step}, handle)
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in paths}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    if kind is not None:
        manifest["kind"] = kind
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for path in [*paths, tmp / MANIFEST]:
        fsync_path(path)
    for directory in sorted({p.parent for p in paths}, reverse=True):
        fsync_path(directory)


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    write: Callable[[Path], None],
    state: dict,
    rng: dict,
    config: dict,
    keep: int,
    rank: int,
    barrier: Callable[[], None],
    all_ok: Callable[[bool], bool] = lambda ok: ok,
) -> Path:
    """Collective save: every rank runs `write(tmp)` and stores its RNG; rank 0 seals and renames.

    The temporary directory has a fixed name so that all ranks agree on it without a broadcast.
    `all_ok(ok)` is a collective (True when every rank passed True): after the writes and after
    the seal every rank learns whether any rank failed, so none waits forever at a barrier; on
    a failure rank 0 removes the temporary directory and every rank raises.
    """
    root = checkpoints_dir(run_dir)
    tmp = root / f"{_TMP_PREFIX}step_{step}-sharded"
    final = root / f"step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()

    def write_own() -> None:
        write(tmp)
        with open(tmp / _rng_file(rank), "wb") as handle:
            torch.save(rng, handle)

    def seal() -> None:
        if rank == 0:
            _seal(tmp, step, state, config, SHARDED)
            _move_into_place(tmp, final)
            prune_checkpoints(run_dir, step, keep)

    for part in (write_own, seal):
        error: Exception | None = None
        try:
            part()
        except Exception as err:
            error = err
        if not all_ok(error is None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is None:
                raise LensError(
                    f"Checkpoint '{final}' could not be written: another rank failed while "
                    "writing its part (see that rank's error); rerun with --resume."
                )
            if is_out_of_space(error):
                raise out_of_space_error(final, "rerun with --resume") from None
            raise error
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` admitting only the exact (module, name) pairs of `_DCP_GLOBALS`."""

    def find_class(self, module: str, name: str) -> object:
        # Exact pairs only: a prefix rule let protocol-4 dotted names (e.g. "os.system" looked up
        # inside a DCP module that imports os) resolve to arbitrary callables.
        if (module, name) not in _DCP_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}:{name} from checkpoint metadata"
            )
        return super().find_class(module, name)


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = frozenset(
    {
        # DCP's metadata dataclasses and enum (what `Metadata` and its values are made of).
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        # Plain value types the dataclasses hold.
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # name -> torch.layout lookup, nothing else
        ("pathlib", "PosixPath"),  # the checkpoint id DCP records; constructing a path runs nothing
        ("pathlib._local", "PosixPath"),  # the same class on Python >= 3.13
        # torch's dtype objects by their exact names (torch.float32, torch.bfloat16, ...).
        *(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)),
    }
)


def _read_dcp_metadata(handle, path: Path) -> object:
    try:
        return _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as err:
        raise LensError(f"Checkpoint '{path}' has unsafe or corrupt metadata ({err}).") from None


def _safe_reader(path: Path) -> object:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as handle:
                metadata = _read_dcp_metadata(handle, path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner() -> object:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(
            self, read_item, value
        ):  # non-tensor items: weights_only, never plain pickle
            item = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
            else:
                self.state_dict[read_item.dest_index.fqn] = item

    return SafePlanner()


def dcp_load(target: dict, path: Path) -> None:
    """`torch.distributed.checkpoint.load` without plain unpickling of metadata or extra items."""
    import torch.distributed.checkpoint as dcp

    with open(Path(path) / ".metadata", "rb") as handle:  # fail here with one sentence, not in DCP
        _read_dcp_metadata(handle, Path(path))
    dcp.load(target, storage_reader=_safe_reader(path), planner=_safe_planner())


def load_sharded_state(path: Path, rank: int) -> tuple[dict, dict | None]:
    """Verify a sharded checkpoint; its `state.pt` and this rank's RNG (None if it had no such rank)."""
    path = Path(path)
    state = _verified_state(path)
    rng_path = path / _rng_file(rank)
    return state, load_state(rng_path) if rng_path.is_file() else None


# The run's checkpoints: what the trainer saves and restores, in either format. The engines only
# hand over state: the optimizer's and scheduler's `state_dict`, `sharded_state` /
# `set_sharded_state` (torch.distributed.checkpoint dicts), `load_full`, and DeepSpeed's own files.


def save_run(
    engine: Engine, cfg: LensConfig, step: int, train_state: dict, ema: Ema | None
) -> Path:
    """Checkpoint a run at `step` (collectively under ddp/fsdp/deepspeed, where all ranks call it)."""
    run_dir, keep, config = cfg.train.run_dir, cfg.train.keep_checkpoints, dump_config(cfg)
    rank, world = rank_world()
    # What `batch_in_epoch` counts in, so a resume with another global batch can rescale it.
    global_batch = cfg.train.batch_size * world
    if not engine.sharded:
        state = {
            "optimizer": engine.optimizer.state_dict(),
            "scheduler": engine.scheduler.state_dict(),
            "rng": capture_rng(),
            "train_state": train_state,
            "global_batch": global_batch,
        }
        return save_checkpoint(
            run_dir,
            step,
            engine.lens.trainable_state_dict(),
            state,
            config,
            ema=ema.state_dict() if ema is not None else None,
            keep=keep,
        )

    def write(tmp: Path) -> None:
        if engine.own_format is None:
            import torch.distributed.checkpoint as dcp

            dcp.save(engine.sharded_state(ema), checkpoint_id=tmp)
            return
        engine.write_own(tmp)
        if ema is not None and rank == 0:
            save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, tmp / EMA)

    state = {
        "scheduler": engine.scheduler.state_dict(),
        "train_state": train_state,
        "global_batch": global_batch,
        "world_size": world,
    }
    return save_sharded_checkpoint(
        run_dir, step, write, state, capture_rng(), config, keep, rank, barrier, engine.all_ok
    )


def check_resume_config(cfg: LensConfig, path: Path) -> None:
    """Refuse to resume a checkpoint trained with another value of any weight-defining setting."""
    saved = weight_settings(read_config(path))
    for key, new in weight_settings(dump_config(cfg)).items():
        if saved[key] != new:
            raise LensError(
                f"Cannot resume from '{path}': it was trained with {key}={saved[key]!r} but the "
                f"config says {key}={new!r}; use the same config or a new train.run_dir."
            )


def restore_run(engine: Engine, cfg: LensConfig, ema: Ema | None, path: Path) -> dict:
    """Load weights, optimizer, scheduler, EMA and RNG from a checkpoint; the train-state dict."""
    check_resume_config(cfg, path)
    if engine.own_format is not None:
        return _restore_own(engine, cfg, ema, path)
    if engine.sharded or is_sharded(path):
        # Either side sharded: map between world sizes and formats.
        return _restore_mapped(engine, cfg, ema, path)
    loaded = load_checkpoint(path)
    engine.lens.load_trainable_state_dict(loaded.trainable)
    engine.optimizer.load_state_dict(loaded.state["optimizer"])
    engine.scheduler.load_state_dict(loaded.state["scheduler"])
    if ema is not None:
        ema.load_state_dict(loaded.ema or engine.lens.trainable_parameters())
    restore_rng(loaded.state["rng"])
    return dict(loaded.state["train_state"])


def _restore_mapped(engine: Engine, cfg: LensConfig, ema: Ema | None, path: Path) -> dict:
    """Any checkpoint (sharded or single-process) into a DCP-capable engine of any world size."""
    rank, world = rank_world()
    if is_sharded(path):
        state, rng = load_sharded_state(path, rank)
        target = engine.sharded_state(ema)
        dcp_load(target, path)
        engine.set_sharded_state(target)
    else:
        loaded = load_checkpoint(path)
        state, rng = loaded.state, loaded.state["rng"] if rank == 0 else None
        engine.load_full(loaded.trainable, loaded.state["optimizer"])
        if ema is not None and loaded.ema is not None:
            _copy_into(ema.shadow, loaded.ema)
    engine.scheduler.load_state_dict(state["scheduler"])
    _restore_rng(rng, cfg.seed, state["step"])
    return _rescale_position(state, cfg.train.batch_size * world)


def _restore_own(engine: Engine, cfg: LensConfig, ema: Ema | None, path: Path) -> dict:
    """A checkpoint in the engine's own format (DeepSpeed), written with the same world size."""
    rank, world = rank_world()
    if not (path / engine.own_format).is_dir():
        raise LensError(
            f"Checkpoint '{path}' was not written with distributed.strategy="
            f"{engine.own_format}; resume it with the strategy that wrote it."
        )
    state, rng = load_sharded_state(path, rank)
    if state.get("world_size") != world:
        raise LensError(
            f"Checkpoint '{path}' was written by {state.get('world_size')} DeepSpeed ranks; "
            f"resume it with {state.get('world_size')} ranks, not {world}."
        )
    engine.read_own(path)
    if ema is not None and (path / EMA).is_file():
        _copy_into(ema.shadow, load_file(str(path / EMA)))
    engine.scheduler.load_state_dict(state["scheduler"])
    _restore_rng(rng, cfg.seed, state["step"])
    return dict(state["train_state"])


def _copy_into(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for key, value in target.items():
            if isinstance(value, DTensor):
                src = distribute_tensor(
                    source[key].to(value.dtype), value.device_mesh, value.placements
                )
                value.copy_(src)
            else:
                value.copy_(source[key])


def _restore_rng(rng: dict | None, seed: int, step: int) -> None:
    # A rank that did not exist when the checkpoint was written gets a fresh stream from
    # (seed, rank, step); same-size resumes restore every rank's stream exactly.
    if rng is not None:
        restore_rng(rng)
    else:
        seed_all(rank_seed(seed) + 1_000_003 * step)


def _rescale_position(state: dict, global_batch: int) -> dict:
    # The data position counts global batches; keep the number of samples seen when the global
    # batch (batch_size x world) changed, rounding down to a whole batch.
    train_state = dict(state["train_state"])
    saved = int(state.get("global_batch", global_batch))
    train_state["batch_in_epoch"] = train_state["batch_in_epoch"] * saved // global_batch
    return train_state


def checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The newest valid checkpoint to resume from (None to start fresh), or refuse a fresh start
    over existing checkpoints."""
    existing = list_checkpoints(run_dir)
    if not resume:
        if existing:
            raise LensError(
                f"'{run_dir}' already holds checkpoints; pass --resume to continue that run or "
                "choose another train.run_dir."
            )
        return None
    return latest_valid(run_dir)
