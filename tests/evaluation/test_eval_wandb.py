"""Qualitative samples go to an offline wandb run as a Table."""

from __future__ import annotations

import json

import pytest

from consistency_lens.config import config_from_dict
from consistency_lens.evaluation.samples import log_samples_wandb

wandb = pytest.importorskip("wandb")


def test_samples_logged_as_wandb_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = config_from_dict(
        {"train": {"run_dir": str(tmp_path)}, "wandb": {"enabled": True, "mode": "offline"}}
    )
    record = {
        "index": 3,
        "position": 5,
        "context_elided": 0,
        "context_tokens": ["a", " b"],
        "greedy": " c",
        "kl": 0.1,
        "cosine": 0.5,
        "sampled": [" d"],
        "sampled_kl": [0.2],
    }
    log_samples_wandb([record], cfg)
    assert wandb.run is None  # the run it opened is finished
    files = list(tmp_path.glob("wandb/offline-run-*/files/media/table/qualitative_samples_*.json"))
    assert len(files) == 1
    table = json.loads(files[0].read_text())
    assert table["columns"][:3] == ["index", "context", "greedy"]
    assert table["data"][0][:3] == [3, "a[[ b]]", " c"]
