"""What both formats share: `state.pt`, `config.json` and a manifest with the sha256 of every
file, written last (sealing the directory) and checked before anything is read back.

`state.pt` is only ever loaded with `torch.load(weights_only=True)`."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch

from consistency_lens.errors import LensError
from consistency_lens.training.checkpoint.layout import (
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    SHARDED,
    STATE,
    TRAINABLE,
    list_checkpoints,
)
from consistency_lens.utils.io import fsync_path, read_json, sha256_file

log = logging.getLogger("consistency_lens")


def seal(tmp: Path, step: int, state: dict, config: dict, kind: str | None = None) -> None:
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


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint at `path` was written collectively (ddp/fsdp/deepspeed)."""
    try:
        return _read_manifest(Path(path)).get("kind") == SHARDED
    except ValueError:
        return False


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


def verified_state(path: Path) -> dict:
    """`state.pt` of a checkpoint whose checksums and format version check out."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise LensError(f"Checkpoint '{path}' is corrupt: {problem}.")
    state = load_state(path / STATE)
    _check_version(path, state.get("format_version"))
    return state


def read_config(path: Path) -> dict:
    """The run config stored with a checkpoint."""
    return read_json(Path(path) / CONFIG, "Checkpoint config")
