"""The training stream: prefetching in a background process changes no batch, resume included,
and survives the SIGTERM that asks the trainer to checkpoint."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, fields

import torch
from conftest import split_of, tiny_dump_config

from consistency_lens.config import config_from_dict
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.dump import dump_activations
from consistency_lens.data.stream import BatchStream


@dataclass
class Position:
    epoch: int = 0
    batch_in_epoch: int = 0


def _batches(stream: BatchStream, state: Position, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        batch = stream.next(state)
        out.append({f.name: getattr(batch, f.name) for f in fields(batch)})
        out[-1]["position"] = (state.epoch, state.batch_in_epoch)
    return out


def _train_split(tmp_path, model_dir, corpus_dir, num_samples: int) -> ActivationDataset:
    cfg = config_from_dict(
        tiny_dump_config(tmp_path, model_dir, corpus_dir, num_samples=num_samples, val_samples=4)
    )
    dump_activations(cfg)
    return ActivationDataset(split_of(cfg, "train"), seed=0)


def _assert_same(got: list[dict], want: list[dict]) -> None:
    for got_batch, want_batch in zip(got, want, strict=True):
        assert got_batch.keys() == want_batch.keys()
        for name, value in want_batch.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got_batch[name], value), name
            else:
                assert got_batch[name] == value, name


def test_prefetching_stream_gives_the_same_batches_and_resumes_exactly(
    tmp_path, tiny_llama_dir, corpus_dir
):
    dataset = _train_split(tmp_path, tiny_llama_dir, corpus_dir, 12)

    def stream(prefetch: bool) -> BatchStream:
        return BatchStream(dataset, 4, 0, CollateFn(), prefetch=prefetch)

    # 3 batches an epoch: 8 batches cross two epoch boundaries.
    plain = _batches(stream(False), Position(), 8)
    ahead = _batches(stream(True), Position(), 8)
    resumed = _batches(stream(True), Position(epoch=1, batch_in_epoch=1), 3)
    _assert_same(ahead, plain)
    _assert_same(resumed, plain[4:7])
    assert plain[3]["position"] == (1, 1)


def test_prefetch_worker_survives_the_sigterm_sent_to_the_process_group(
    tmp_path, tiny_llama_dir, corpus_dir
):
    # `timeout` (and Slurm) signal the whole group: the worker must live on so that the trainer,
    # which checkpoints on SIGTERM, still gets its batches; a dead worker makes `next` raise.
    dataset = _train_split(tmp_path, tiny_llama_dir, corpus_dir, 40)
    plain = _batches(BatchStream(dataset, 4, 0, CollateFn()), Position(), 7)
    before = set(multiprocessing.active_children())
    stream = BatchStream(dataset, 4, 0, CollateFn(), prefetch=True)
    state = Position()
    first = _batches(stream, state, 1)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGTERM)
    time.sleep(0.5)
    assert workers[0].is_alive()
    rest = _batches(stream, state, 6)  # more than the two it had read ahead
    _assert_same([*first, *rest], plain)
