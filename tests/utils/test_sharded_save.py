"""Collective (sharded) checkpoint saves: a rank that fails its write must not leave the others hanging."""

from __future__ import annotations

import errno
import threading

import pytest

from consistency_lens.errors import LensError
from consistency_lens.training import checkpoint as ck

RANKS = 2


class _Group:
    """Two ranks as threads: a barrier and an all-reduce (MIN) of a success flag."""

    def __init__(self):
        self._barrier = threading.Barrier(RANKS, timeout=10)
        self._flags: list[bool] = []
        self._lock = threading.Lock()

    def barrier(self) -> None:
        self._barrier.wait()

    def all_ok(self, ok: bool) -> bool:
        with self._lock:
            self._flags.append(ok)
        self._barrier.wait()
        result = all(self._flags)
        self._barrier.wait()
        with self._lock:
            self._flags.clear()
        self._barrier.wait()
        return result


def _save_on_ranks(run_dir, failing_rank: int | None) -> list[BaseException | None]:
    group, errors = _Group(), [None] * RANKS

    def rank_main(rank: int) -> None:
        def write(tmp):
            if rank == failing_rank:
                raise OSError(errno.ENOSPC, "No space left on device")
            (tmp / f"part_{rank}").write_bytes(b"x")

        try:
            ck.save_sharded_checkpoint(
                run_dir, 3, write, {}, {}, {}, 2, rank, group.barrier, group.all_ok
            )
        except BaseException as err:  # noqa: BLE001 - recorded for the test
            errors[rank] = err

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(RANKS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return errors


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_failed_write_on_one_rank_raises_on_every_rank(tmp_path, failing_rank):
    errors = _save_on_ranks(tmp_path, failing_rank)
    assert all(isinstance(e, LensError) for e in errors), errors
    assert "No space left" in str(errors[failing_rank])
    assert "another rank failed" in str(errors[1 - failing_rank])
    # Neither a partial temporary directory nor a checkpoint is left behind.
    assert list(ck.checkpoints_dir(tmp_path).iterdir()) == []


def test_sharded_save_succeeds_on_every_rank(tmp_path):
    assert _save_on_ranks(tmp_path, None) == [None, None]
    path = ck.checkpoints_dir(tmp_path) / "step_3"
    assert ck.is_sharded(path) and (path / "part_0").is_file() and (path / "part_1").is_file()
