"""Checkpoints: atomic directories, checksum fallback, weights-only state, version check."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from consistency_lens.errors import LensError
from consistency_lens.training import checkpoint as ck
from consistency_lens.utils.io import sha256_file


def _save(run_dir: Path, step: int, keep: int = 5, ema: bool = False) -> Path:
    trainable = {"proj.weight": torch.full((3, 2), float(step)), "proj.bias": torch.zeros(3)}
    state = {"optimizer": {"state": {}, "param_groups": []}, "rng": ck.capture_rng(), "pos": step}
    return ck.save_checkpoint(
        run_dir,
        step,
        trainable,
        state,
        {"seed": 0},
        ema={"proj.weight": torch.ones(3, 2)} if ema else None,
        keep=keep,
    )


def test_roundtrip_and_layout(tmp_path):
    path = _save(tmp_path, 3, ema=True)
    assert path == tmp_path / "checkpoints" / "step_3"
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted([ck.TRAINABLE, ck.EMA, ck.STATE, ck.CONFIG, ck.MANIFEST])
    manifest = json.loads((path / ck.MANIFEST).read_text())
    assert manifest["format_version"] == ck.FORMAT_VERSION
    assert set(manifest["files"]) == {ck.TRAINABLE, ck.EMA, ck.STATE, ck.CONFIG}
    loaded = ck.load_checkpoint(path)
    assert loaded.step == 3 and loaded.state["pos"] == 3
    assert torch.equal(loaded.trainable["proj.weight"], torch.full((3, 2), 3.0))
    assert loaded.ema is not None and torch.equal(loaded.ema["proj.weight"], torch.ones(3, 2))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_failed_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def boom(*args, **kwargs):
        raise OSError("disk trouble")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        _save(tmp_path, 2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert ck.latest_valid(tmp_path) == tmp_path / "checkpoints" / "step_1"


def test_out_of_space_is_one_sentence(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(LensError, match="No space left"):
        _save(tmp_path, 1)
    assert ck.list_checkpoints(tmp_path) == []


def test_keep_last_n(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]


def test_resaving_a_step_replaces_it_and_drops_newer_stale_ones(tmp_path):
    for step in (2, 4):
        _save(tmp_path, step)
    _save(tmp_path, 2)  # a resume that fell back to step 2 rewrites it
    _save(tmp_path, 3)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3]


def test_bit_flip_is_named_and_skipped(tmp_path, caplog):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    data = bytearray((bad / ck.TRAINABLE).read_bytes())
    data[-1] ^= 0x01
    (bad / ck.TRAINABLE).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="consistency_lens"):
        assert ck.latest_valid(tmp_path) == tmp_path / "checkpoints" / "step_1"
    assert "step_2" in caplog.text and ck.TRAINABLE in caplog.text and "checksum" in caplog.text
    with pytest.raises(LensError, match="corrupt"):
        ck.load_checkpoint(bad)


def test_truncated_and_missing_files_are_skipped(tmp_path, caplog):
    _save(tmp_path, 1)
    truncated = _save(tmp_path, 2)
    missing = _save(tmp_path, 3)
    state = truncated / ck.STATE
    state.write_bytes(state.read_bytes()[:20])
    (missing / ck.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="consistency_lens"):
        assert ck.latest_valid(tmp_path).name == "step_1"
    assert "step_3" in caplog.text and "manifest.json is missing" in caplog.text
    assert "step_2" in caplog.text and ck.STATE in caplog.text


def test_no_checkpoint_is_none(tmp_path):
    assert ck.latest_valid(tmp_path) is None


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    path = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _Evil(str(marker))}, path / ck.STATE)
    # The attacker also fixes the manifest so that only weights_only loading stands in the way.
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["files"][ck.STATE] = sha256_file(path / ck.STATE)
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    assert ck.latest_valid(tmp_path) == path
    with pytest.raises(LensError, match="Refusing to load checkpoint state"):
        ck.load_checkpoint(path)
    assert not marker.exists()


def test_incompatible_version_is_a_clear_error(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["format_version"] = 99
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LensError, match=r"format version 99 .* reads version 1"):
        ck.latest_valid(tmp_path)


def test_rng_roundtrip_through_weights_only_state(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _save(tmp_path, 1)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    ck.restore_rng(ck.load_checkpoint(tmp_path / "checkpoints" / "step_1").state["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
