"""Run logging: metrics.jsonl lines, truncation on resume, rank-0 only, wandb offline."""

from __future__ import annotations

import io
import json

from rich.console import Console

from consistency_lens.config import WandbConfig
from consistency_lens.utils.logging import METRICS, MetricsFile, RunLogger

STATS = {
    "loss": 1.0,
    "loss_kl": 0.5,
    "loss_lm": 0.5,
    "tau": 1.5,
    "alpha": 1.0,
    "samples_per_s": 10.0,
}


def _quiet() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def test_one_line_per_log_step(tmp_path):
    with RunLogger(tmp_path, total_steps=4, console=_quiet()) as log:
        for step in (1, 2, 3):
            log.update(step, STATS)
            log.log(step, STATS)
        log.log(3, {"val_kl": 0.1}, kind="val")
    records = MetricsFile(tmp_path / METRICS).read()
    assert [(r["step"], r["kind"]) for r in records] == [
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (3, "val"),
    ]
    assert records[0]["loss_kl"] == 0.5


def test_resume_truncates_later_steps_and_torn_line(tmp_path):
    metrics = MetricsFile(tmp_path / METRICS)
    for step in (1, 2, 3, 4):
        metrics.append({"step": step})
    with open(metrics.path, "a") as handle:
        handle.write('{"step": 5, "lo')  # a crash mid-line
    with RunLogger(tmp_path, total_steps=6, resume_step=2, console=_quiet()) as log:
        log.log(3, STATS)
    assert [r["step"] for r in metrics.read()] == [1, 2, 3]
    for line in metrics.path.read_text().splitlines():
        json.loads(line)


def test_fresh_run_starts_an_empty_file(tmp_path):
    MetricsFile(tmp_path / METRICS).append({"step": 0, "kind": "val"})
    with RunLogger(tmp_path, total_steps=2, console=_quiet()) as log:
        log.log(0, {"val_kl": 1.0}, kind="val")
    assert len(MetricsFile(tmp_path / METRICS).read()) == 1


def test_non_main_rank_writes_nothing(tmp_path):
    console = Console(file=io.StringIO())
    with RunLogger(tmp_path, total_steps=2, is_main=False, console=console) as log:
        log.update(1, STATS)
        log.log(1, STATS)
        log.info("hello")
    assert not (tmp_path / METRICS).exists()
    assert console.file.getvalue() == ""


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    cfg = WandbConfig(enabled=True, mode="offline", project="test")
    with RunLogger(tmp_path, 2, wandb_cfg=cfg, config={"a": 1}, console=_quiet()) as log:
        log.log(1, STATS)
    assert (tmp_path / "wandb_id.txt").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
