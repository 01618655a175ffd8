"""One owner per directory: an exclusive `fcntl.flock` on `<dir>/.lock`, holding the owner's PID.

The kernel drops a flock when its owner exits or dies (even by SIGKILL), so a lock file left
behind by a dead process is stale and the next run takes it. The PID written into it only names
the holder in the refusal; it never decides whether the lock is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from consistency_lens.errors import LensError

LOCK_FILE = ".lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def dir_lock(directory: Path, what: str, fix: str) -> Iterator[Path]:
    """Hold `<directory>/.lock` exclusively for the block; refuse in one sentence if another has it.

    `what` names the directory's role ("dump split", "run directory") and `fix` the way out.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise LensError(
            f"Cannot create the {what} '{directory}' ({err.strerror}); choose a writable "
            "directory that is not a file."
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LensError(
                f"The {what} '{directory}' is in use by another consistency-lens process "
                f"(PID {_holder(directory / LOCK_FILE)}); wait for it to finish or {fix}."
            ) from None
        # Only the holder writes, so a refused run never touches the file.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield directory / LOCK_FILE
        finally:
            # Emptied while still held, so a finished run leaves the same bytes whoever ran it.
            os.ftruncate(fd, 0)
    finally:
        # Closing the descriptor releases the flock; the file stays (removing it would race
        # with a process that opened it and is about to lock it).
        os.close(fd)
