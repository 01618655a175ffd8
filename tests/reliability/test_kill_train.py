"""SIGKILL `consistency-lens train` at random progress points; `--resume` ends with the same weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_dump_config
from safetensors.torch import load_file

from consistency_lens.config import config_from_dict
from consistency_lens.data.dump import dump_activations
from consistency_lens.training import checkpoint as ck
from consistency_lens.utils.logging import METRICS, MetricsFile

STEPS = 12
_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, tiny_llama_dir, corpus_dir) -> dict:
    """A tiny dump made in-process; the trainer subprocesses read it."""
    root = tmp_path_factory.mktemp("kill_train")
    base = tiny_dump_config(
        root, tiny_llama_dir, corpus_dir, seq_len=24, p_min=3, shard_size=8, seed=2
    )
    dump_activations(config_from_dict(base))
    return base


def _cmd(base: dict, run_dir: Path, resume: bool) -> list[str]:
    # Checkpoints every 3 steps, so most kills lose steps that the resumed run must redo exactly;
    # full mode puts transformer blocks, AdamW moments and EMA into the checkpoint.
    overrides = [f"{k}={v}" for k, v in base.items()] + [
        f"train.run_dir={run_dir}",
        "train.mode=full",
        "train.t_text=2",
        "train.batch_size=4",
        "train.grad_accum=2",
        f"train.steps={STEPS}",
        "train.ckpt_every=3",
        "train.keep_checkpoints=2",
        "train.val_every=4",
        "train.val_batches=1",
        "train.log_every=1",
        "train.ema_decay=0.5",
        "train.prompt=A <embed> is",
    ]
    flags = ["--resume"] if resume else []
    return [sys.executable, "-m", "consistency_lens", "train", *overrides, *flags]


def _steps_logged(run_dir: Path) -> int:
    records = MetricsFile(run_dir / METRICS).read()
    return max((r["step"] for r in records if r.get("kind") == "train"), default=0)


def _finished(run_dir: Path) -> bool:
    return (run_dir / "lens" / "lens_config.json").exists()


def _run_to_end(base: dict, run_dir: Path, resume: bool) -> None:
    done = subprocess.run(
        _cmd(base, run_dir, resume), capture_output=True, text=True, timeout=300, env=_ENV
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _run_and_kill(base: dict, run_dir: Path, resume: bool, at_step: int, delay: float) -> None:
    """Start training and SIGKILL it once `at_step` steps are logged plus `delay` seconds."""
    proc = subprocess.Popen(
        _cmd(base, run_dir, resume),
        env=_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while _steps_logged(run_dir) < at_step:
        if proc.poll() is not None:
            pytest.fail(
                f"train exited before step {at_step}: {proc.stderr.read().decode()[-2000:]}"
            )
        assert time.monotonic() < deadline, "train made no progress"
        time.sleep(0.005)
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    # Without this the test could pass without ever interrupting anything.
    assert alive and proc.returncode == -signal.SIGKILL, "the kill came after train exited"
    assert not _finished(run_dir), "the kill came after train finished"


def _state(run_dir: Path, lens: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / lens / "lens.safetensors"))


def _records(run_dir: Path) -> list[dict]:
    drop = {"time", "samples_per_s"}
    return [
        {k: v for k, v in r.items() if k not in drop} for r in MetricsFile(run_dir / METRICS).read()
    ]


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(dumped, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run_to_end(dumped, straight, resume=False)
    rng = random.Random(11)
    # Growing progress points, each with a random extra delay that lands anywhere inside a step
    # (including in the middle of a checkpoint write).
    targets = sorted(rng.sample(range(1, STEPS - 2), 3))
    for number, target in enumerate(targets):
        _run_and_kill(dumped, killed, number > 0, target, rng.uniform(0.0, 0.15))
    assert ck.latest_valid(killed) is not None
    _run_to_end(dumped, killed, resume=True)

    for lens in ("lens", "lens_ema"):
        a, b = _state(straight, lens), _state(killed, lens)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), lens
    assert _records(straight) == _records(killed)
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    assert not list(killed.rglob("*.tmp"))
