"""The run report renders in a real headless browser with its plots and tables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from consistency_lens.evaluation.report import write_report
from consistency_lens.evaluation.samples import write_samples
from consistency_lens.utils.io import atomic_write_json


def fake_results() -> dict:
    """An eval_results.json with the schema `evaluate` writes."""
    base = {"kl": 2.0, "kl_ci": [1.8, 2.2], "kl_recovered": 0.6, "kl_recovered_ci": [0.5, 0.7]}
    return {
        "checkpoint": "runs/x/lens",
        "model": "tiny",
        "layer": 2,
        "t_text": 4,
        "num_samples": 32,
        "kl": {"mean": 0.8, "ci": [0.7, 0.9]},
        "baselines": {"zero": base, "mean": dict(base, kl=1.5), "context_tokens": base},
        "mse": 0.1,
        "nmse": 0.2,
        "fve": {"mean": 0.5, "ci": [0.4, 0.6]},
        "cosine": {"mean": 0.9, "ci": [0.88, 0.92]},
        "perplexity": 40.0,
        "diversity": {"fraction_unique": 0.8, "distinct_1": 0.5, "distinct_2": 0.7},
    }


def fake_samples() -> list[dict]:
    """Qualitative sample records with the schema `qualitative_samples` returns."""
    return [
        {
            "index": i,
            "position": 20,
            "context_elided": 5,
            "context_tokens": ["The", " nation", " <b>", " economy"],
            "greedy": " the economy of",
            "kl": 0.5,
            "cosine": 0.9,
            "sampled": [" war", " taxes & trade"],
            "sampled_kl": [0.7, 0.9],
        }
        for i in range(3)
    ]


def make_run(run_dir: Path) -> None:
    """A run directory as train + eval leave it."""
    lines = []
    for step in range(0, 50, 10):
        lines.append(
            {
                "step": step,
                "loss": 5.0 / (step + 1),
                "loss_kl": 3.0 / (step + 1),
                "loss_lm": 0.5,
                "tau": 2.0 - step / 50,
                "alpha": 1.0,
                "lr": 1e-3,
            }
        )
    lines.append({"step": 49, "val_kl": 0.9, "val_mse": 0.1, "val_fve": 0.4})
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 50, "lo'  # torn last line
    (run_dir / "metrics.jsonl").write_text(text)
    atomic_write_json(run_dir / "eval_results.json", fake_results())
    write_samples(fake_samples(), run_dir)


def test_report_is_self_contained(tmp_path):
    make_run(tmp_path)
    html = write_report(tmp_path).read_text()
    assert "<script src=" not in html  # plotly.js is inline, so the page works offline
    assert html.count('class="plotly-graph-div"') == 9  # one per curve in CURVES
    assert "zero ablation" in html and "context tokens" in html
    assert "&lt;b&gt;" in html  # context tokens are escaped
    assert "taxes &amp; trade" in html


def test_report_without_training_or_eval(tmp_path):
    html = write_report(tmp_path).read_text()
    assert "No metrics.jsonl rows yet" in html and "No eval_results.json" in html
    assert "<script" not in html


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    env = {
        **os.environ,
        "DEBIAN_FRONTEND": "noninteractive",
    }  # CI has no terminal to answer prompts
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=600, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "chromium"],
            check=True,
            capture_output=True,
            timeout=900,
            env=env,
        )
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(
            f"headless chromium is not installed and `apt-get install chromium` failed: {err}"
        )
    return shutil.which("chromium")


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("`apt-get install chromium` ran but no chromium binary is on PATH")
    run_dir = tmp_path / "run"
    make_run(run_dir)
    report = write_report(run_dir)
    base = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180
    ).stdout
    # plotly replaces each empty div by an SVG scene once its JS has run.
    assert dom.count('class="main-svg"') >= 9, dom[:2000]
    assert dom.count('class="scatterlayer') >= 9
    assert '<table class="eval">' in dom and '<table class="samples">' in dom
    assert "mean ablation" in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()],
        capture_output=True,
        timeout=180,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_run_objective_comes_from_the_lens_else_the_newest_checkpoint(tmp_path):
    """A run stopped before it saved a lens is still drawn with its own objective's curves."""
    from consistency_lens.evaluation.report import run_objective

    assert run_objective(tmp_path) == "plan"
    for step, objective in ((10, "warm_start"), (20, "grpo")):
        ckpt = tmp_path / "checkpoints" / f"step_{step}"
        ckpt.mkdir(parents=True)
        atomic_write_json(ckpt / "config.json", {"train": {"objective": objective}})
    assert run_objective(tmp_path) == "grpo"
    (tmp_path / "checkpoints" / "step_20" / "config.json").write_text("{half")
    assert run_objective(tmp_path) == "plan"  # a damaged config: the plain curves, no crash
    (tmp_path / "lens").mkdir()
    atomic_write_json(
        tmp_path / "lens" / "lens_config.json", {"config": {"train": {"objective": "plan"}}}
    )
    assert run_objective(tmp_path) == "plan"
