"""One `train` per run directory, and Ctrl-C (SIGINT) checkpoints and prints the exact resume command."""

from __future__ import annotations

import os
import shlex
import signal
import threading
from pathlib import Path

import pytest
import torch
from conftest import signal_after_step, tiny_dump_config
from safetensors.torch import load_file

from consistency_lens.cli import main
from consistency_lens.config import config_from_dict
from consistency_lens.data.dump import dump_activations
from consistency_lens.training import checkpoint as ck
from consistency_lens.training import trainer
from consistency_lens.utils.logging import METRICS, MetricsFile

_TRAIN = {
    "mode": "full",
    "t_text": 2,
    "steps": 4,
    "batch_size": 4,
    "val_every": 2,
    "val_batches": 1,
    "ckpt_every": 2,
    "log_every": 1,
    "ema_decay": 0.5,
    "prompt": "A <embed> is",
}


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, tiny_llama_dir, corpus_dir) -> dict:
    """A tiny train/val dump of the tiny Llama; returns the base config dict."""
    base = tiny_dump_config(tmp_path_factory.mktemp("dump"), tiny_llama_dir, corpus_dir)
    dump_activations(config_from_dict(base))
    return base


def _argv(base: dict, run_dir: Path) -> list[str]:
    flat = {k: v for k, v in base.items()}
    flat.update({f"train.{k}": v for k, v in _TRAIN.items()})
    flat["train.run_dir"] = run_dir
    return ["train", *(f"{k}={v}" for k, v in flat.items())]


def _lone_run(base: dict, run_dir: Path) -> None:
    main(_argv(base, run_dir))


def _outputs(run_dir: Path) -> tuple[dict, dict, list]:
    weights = load_file(str(run_dir / "lens" / "lens.safetensors"))
    ema = load_file(str(run_dir / "lens_ema" / "lens.safetensors"))
    drop = {"time", "samples_per_s"}
    records = [
        {k: v for k, v in r.items() if k not in drop} for r in MetricsFile(run_dir / METRICS).read()
    ]
    return weights, ema, records


def _assert_same_outputs(a: Path, b: Path) -> None:
    wa, ea, ra = _outputs(a)
    wb, eb, rb = _outputs(b)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert set(ea) == set(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert ra == rb


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli_exit(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exited.value.code, err.strip().splitlines()[-1]


def test_second_train_in_a_run_dir_exits_2_and_the_first_is_untouched(
    dumped, tmp_path, monkeypatch, capsys
):
    shared, lone = tmp_path / "shared", tmp_path / "lone"
    _lone_run(dumped, lone)
    real, stepped, go_on = trainer._train_step, threading.Event(), threading.Event()

    def paused(run):
        metrics = real(run)
        if run.state.step == 2:
            stepped.set()
            assert go_on.wait(120)
        return metrics

    monkeypatch.setattr(trainer, "_train_step", paused)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            main(_argv(dumped, shared))
        except BaseException as err:  # surfaced below
            errors.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert stepped.wait(120)
        before = _snapshot(shared)
        for flags in ([], ["--resume"]):
            code, line = _cli_exit(capsys, [*_argv(dumped, shared), *flags])
            assert code == 2
            assert (
                f"error: The run directory '{shared}' is in use by another consistency-lens "
                f"process (PID {os.getpid()}); wait for it to finish or use another "
                "train.run_dir." == line
            )
            assert _snapshot(shared) == before
    finally:
        go_on.set()
        thread.join(300)
    assert not errors
    _assert_same_outputs(shared, lone)


def test_sigint_checkpoints_and_prints_the_exact_resume_command(
    dumped, tmp_path, monkeypatch, capsys
):
    lone, run_dir = tmp_path / "lone", tmp_path / "run"
    _lone_run(dumped, lone)
    real = signal_after_step(monkeypatch, signal.SIGINT, step=3)
    argv = _argv(dumped, run_dir)
    code, line = _cli_exit(capsys, argv)
    command = shlex.join(["consistency-lens", *argv, "--resume"])
    assert code == 2
    assert line == (
        f"error: Stopped by SIGINT at step 3 after saving a checkpoint; continue with: {command}."
    )
    assert ck.latest_valid(run_dir).name == "step_3" and not (run_dir / "lens").exists()
    # The printed command, run as printed, finishes the run exactly as an uninterrupted one.
    monkeypatch.setattr(trainer, "_train_step", real)
    printed = shlex.split(line.split("continue with: ", 1)[1].rstrip("."))
    assert printed[0] == "consistency-lens"
    main(printed[1:])
    _assert_same_outputs(run_dir, lone)
    # The same command without --resume is the one that is refused.
    code, line = _cli_exit(capsys, argv)
    assert code == 2 and "already holds checkpoints; pass --resume" in line


def test_interrupt_outside_the_loop_names_the_resume_command(dumped, tmp_path, monkeypatch, capsys):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "load_splits", ctrl_c)
    argv = _argv(dumped, tmp_path / "run")
    code, line = _cli_exit(capsys, argv)
    assert code == 130
    assert (
        line
        == f"interrupted; continue with: {shlex.join(['consistency-lens', *argv, '--resume'])}."
    )
