"""The training stream: seeded epoch permutations in global batches, resumable from a position.

Every rank walks the same (seed, epoch) permutation and takes its slice of each global batch, so a
step sees the same samples whatever the world size; the position (epoch, batches consumed) is
what a checkpoint stores, so a resumed run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from consistency_lens.data.collate import Batch, CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.errors import LensError


class StreamPosition(Protocol):
    """Where the stream is: the trainer's state carries these two counters."""

    epoch: int
    batch_in_epoch: int


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a permutation seeded by (seed, epoch), starting after `skip` batches.

    Under torchrun every rank walks the same permutation in global batches of `batch_size * world`
    and takes its own slice, so a step sees the same samples whatever the number of processes.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        skip: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.n, self.batch_size, self.seed, self.epoch, self.skip = n, batch_size, seed, epoch, skip
        self.rank, self.world = rank, world

    def num_batches(self) -> int:
        """Global batches per epoch (a remainder smaller than a batch is dropped unless it is all)."""
        return max(1, self.n // (self.batch_size * self.world))

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for b in range(self.skip, self.num_batches()):
            start = (b * self.world + self.rank) * self.batch_size
            yield order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.skip)


def _ignore_stop_signals(worker_id: int) -> None:
    """A prefetch worker ignores SIGTERM: the main process checkpoints on it and then stops the
    worker itself."""
    # `timeout`, Slurm and a shell's job control signal the whole process group; a worker killed
    # by it makes the main process raise at its next step instead of saving a checkpoint. The
    # cost: the DataLoader's last-resort `terminate()` of a worker that will not stop no longer
    # works (a stuck worker exits when it sees the trainer gone). SIGINT needs nothing here: the
    # worker is forked under the trainer's own SIGINT handler, which only sets a flag.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchStream:
    """Endless micro-batches over epochs; the position lives in (and resumes from) `state`."""

    def __init__(
        self,
        dataset: ActivationDataset,
        batch_size: int,
        seed: int,
        collate: CollateFn,
        rank: int = 0,
        world: int = 1,
        prefetch: bool = False,
    ):
        """`prefetch`: read and collate the next batches in one background process, in pinned
        memory where CUDA is available, so that a GPU step never waits for the host's data."""
        self.dataset, self.batch_size, self.seed, self.collate = dataset, batch_size, seed, collate
        self.rank, self.world, self.prefetch = rank, world, prefetch
        if world > 1 and len(dataset) < batch_size * world:
            raise LensError(
                f"The train split holds {len(dataset)} samples, fewer than one global batch "
                f"(train.batch_size={batch_size} x {world} ranks); lower train.batch_size."
            )
        self._it: Iterator[Batch] | None = None

    def _open(self, state: StreamPosition) -> None:
        self.dataset.set_epoch(state.epoch)
        sampler = EpochBatchSampler(
            len(self.dataset),
            self.batch_size,
            self.seed,
            state.epoch,
            state.batch_in_epoch,
            self.rank,
            self.world,
        )
        # A private generator: the default one would draw from the global torch RNG on every
        # new iterator and shift the Gumbel noise after a resume.
        # The worker walks the same sampler in order, so prefetching changes no batch, and the
        # position still advances only when `next` hands a batch out (resume stays exact). It
        # starts again at every epoch, whose first batch is therefore read in the foreground.
        # Forked, not spawned: the dataset's open safetensors shards cannot be pickled.
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.collate,
            generator=torch.Generator(),
            num_workers=1 if self.prefetch else 0,
            pin_memory=self.prefetch and torch.cuda.is_available(),
            multiprocessing_context="fork" if self.prefetch else None,
            worker_init_fn=_ignore_stop_signals if self.prefetch else None,
        )
        self._it = iter(loader)

    def next(self, state: StreamPosition) -> Batch:
        """The next micro-batch; advances `state.epoch` / `state.batch_in_epoch`."""
        if self._it is None:
            self._open(state)
        batch = next(self._it, None)
        if batch is None:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            self._open(state)
            batch = next(self._it)
        state.batch_in_epoch += 1
        return batch
