"""Atomic writes and checksums: a file is either complete or absent, never half-written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from consistency_lens.errors import LensError


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_out_of_space(err: BaseException) -> bool:
    """Whether `err` (or an error it wraps) is ENOSPC.

    Writers in native code hide the OSError: safetensors raises SafetensorError with the text
    "(os error 28)", and torch.save into a Python file raises RuntimeError chained to the OSError.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "os error 28" in str(current) or "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def out_of_space_error(
    path: Path, rerun: str = "run the same command again to resume"
) -> LensError:
    """The one-sentence error for a full disk while writing `path`."""
    return LensError(
        f"No space left on the device while writing '{path}'; free disk space and {rerun}."
    )


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except Exception as err:
        tmp_path.unlink(missing_ok=True)
        if is_out_of_space(err):
            raise out_of_space_error(path) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


# Names of the temporary files a killed write can leave: `atomic_write`'s own, and the
# `.tmpXXXXXX` of the Rust `tempfile` crate, through which safetensors (0.8) writes a file before
# renaming it into place (inside `atomic_write`'s temporary path, so into the same directory).
STRAY_TEMPS = (".*.tmp", ".tmp??????")


def remove_stray_temps(directory: Path) -> None:
    """Delete the temporary files (`STRAY_TEMPS`) a killed write left in `directory`."""
    for pattern in STRAY_TEMPS:
        for stray in Path(directory).glob(pattern):
            if stray.is_file():
                stray.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj: object) -> None:
    """Write a JSON file atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict:
    """Read a JSON file, or raise a one-sentence error naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LensError(f"{what} '{path}' does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LensError(
            f"{what} '{path}' is corrupt (not valid JSON); delete it and rerun."
        ) from None
    if not isinstance(data, dict):
        raise LensError(f"{what} '{path}' is corrupt (not a JSON object); delete it and rerun.")
    return data


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
