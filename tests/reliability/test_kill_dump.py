"""SIGKILL `consistency-lens dump` at random moments; the rerun finishes with the uninterrupted result."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import split_of
from safetensors.torch import load_file

from consistency_lens.config import config_from_dict


def _args(tmp: Path, model: Path, corpus: Path) -> list[str]:
    return [
        f"model={model}",
        f"corpus={corpus}",
        "layer=2",
        "seq_len=24",
        "p_min=3",
        "num_samples=128",
        "val_samples=16",
        "batch_size=1",
        "shard_size=4",
        "seed=5",
        "dtype=float32",
        "model_dtype=float32",
        "device=cpu",
        f"output_dir={tmp / 'acts'}",
        f"cache_dir={tmp / 'corpus'}",
    ]


def _shards_done(progress: Path) -> int:
    try:
        return len(json.loads(progress.read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _run(
    args: list[str],
    kill_at_shard: int | None = None,
    progress: Path | None = None,
    extra_delay: float = 0.0,
) -> None:
    """Run the dump to completion, or SIGKILL it once `kill_at_shard` shards are done (+ a delay)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consistency_lens", "dump", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if kill_at_shard is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return
    deadline = time.monotonic() + 120
    while (
        _shards_done(progress) < kill_at_shard
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.002)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _contents(directory: Path) -> dict:
    out = {}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            out[path.name] = {k: v.tolist() for k, v in load_file(path).items()}
        elif path.name != "metadata.json":  # metadata records output paths, which differ by design
            out[path.name] = path.read_bytes()
    return out


def test_sigkill_at_random_moments_then_rerun_equals_uninterrupted(
    tmp_path, tiny_llama_dir, corpus_dir
):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _run(_args(clean, tiny_llama_dir, corpus_dir))
    rng = random.Random(7)
    args = _args(killed, tiny_llama_dir, corpus_dir)
    train_dir = split_of(config_from_dict(_cfg_dict(killed, tiny_llama_dir, corpus_dir)), "train")
    targets = sorted(rng.sample(range(1, 22), 3))
    for target in targets:  # kill at growing progress points, at a random moment inside a shard
        _run(args, target, train_dir / "progress.json", extra_delay=rng.uniform(0.0, 0.05))
        assert not (train_dir / "metadata.json").exists(), "the kill came after the dump finished"
    assert _shards_done(train_dir / "progress.json") >= targets[-1]
    _run(args)
    for split in ("train", "val"):
        a = split_of(config_from_dict(_cfg_dict(clean, tiny_llama_dir, corpus_dir)), split)
        b = split_of(config_from_dict(_cfg_dict(killed, tiny_llama_dir, corpus_dir)), split)
        assert _contents(a) == _contents(b)
        assert not list(b.glob(".*.tmp"))


def _cfg_dict(tmp: Path, model: Path, corpus: Path) -> dict:
    return dict(item.split("=", 1) for item in _args(tmp, model, corpus))
