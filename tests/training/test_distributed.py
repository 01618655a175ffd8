"""Multi-process training on CPU (gloo, 2 ranks under torchrun): DDP, FSDP2, DeepSpeed, resharding.

Every multi-process run is compared with one process on the same global batch. Both use Gumbel
noise fixed per row parity (tests/training/dist_entry.py), because each rank draws its own noise
by design, and both use AdamW with eps=1e-5 (`coarse_eps`): with the default 1e-8 a near-zero
gradient entry amplifies float reduction-order differences up to lr/eps = 1e6 times into the
weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_dump_config, tiny_train_config
from dist_entry import coarse_eps, parity_noise
from safetensors.torch import load_file

from consistency_lens.config import config_from_dict
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.models import decoder
from consistency_lens.training import checkpoint as ck
from consistency_lens.training import distributed, trainer
from consistency_lens.training.checkpoint.resume import rescale_position
from consistency_lens.utils import dist
from consistency_lens.utils.logging import METRICS, MetricsFile

ENTRY = Path(__file__).with_name("dist_entry.py")
# Per-rank micro-batch; one process gets RANKS x this so that the global batch is the same.
BATCH, RANKS = 2, 2


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, tiny_llama_dir, corpus_dir) -> dict:
    """A tiny train/val dump of the tiny Llama; returns the base config dict."""
    tmp = tmp_path_factory.mktemp("dist")
    base = tiny_dump_config(tmp, tiny_llama_dir, corpus_dir, val_samples=4)
    dump_activations(config_from_dict(base))
    return base


def _train_cfg(run_dir: Path, mode: str, steps: int, batch: int, strategy: str) -> dict:
    return tiny_train_config(
        run_dir,
        mode=mode,
        steps=steps,
        batch_size=batch,
        grad_accum=2,
        lr=1e-2,
        lr_blocks=1e-3,
        lr_schedule={"kind": "constant", "start": 1.0},
        val_every=100,
    )


def _overrides(base: dict, train: dict, strategy: str) -> list[str]:
    flat = [f"{k}={v}" for k, v in base.items()]
    for key, value in train.items():
        if isinstance(value, dict):
            flat += [f"train.{key}.{k}={v}" for k, v in value.items()]
        else:
            flat.append(f"train.{key}={value}")
    return [*flat, f"distributed.strategy={strategy}"]


def _extensions_dir() -> str:
    """A persistent cache for DeepSpeed's JIT-built ops: the first build takes ~40 s, later ones none."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return os.environ["TORCH_EXTENSIONS_DIR"]
    return str(Path.home() / ".cache" / "consistency-lens" / "torch_extensions")


def _torchrun(
    base: dict,
    run_dir: Path,
    *,
    strategy: str,
    mode: str = "full",
    steps: int = 2,
    nproc: int = RANKS,
    resume: bool = False,
    extra: tuple[str, ...] = (),
    recipe: dict | None = None,
) -> subprocess.CompletedProcess:
    train = _train_cfg(run_dir, mode, steps, BATCH * RANKS // nproc, strategy) | (recipe or {})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(ENTRY),
        "train",
        *_overrides(base, train, strategy),
        *extra,
        *(["--resume"] if resume else []),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": _extensions_dir(),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    # A clean teardown: no abort, no process-group leak warning.
    assert (
        "Aborted" not in done.stderr and "destroy_process_group() was not called" not in done.stderr
    )
    return done


def _single(
    base: dict,
    run_dir: Path,
    monkeypatch,
    *,
    mode: str = "full",
    steps: int = 2,
    resume=False,
    recipe: dict | None = None,
) -> None:
    monkeypatch.setattr(decoder, "gumbel_noise", parity_noise)
    # The same AdamW eps as the torchrun side (dist_entry); wrapping a wrapped builder only sets
    # eps again, so repeated calls in one monkeypatch context are harmless.
    monkeypatch.setattr(distributed, "build_optimizer", coarse_eps(distributed.build_optimizer))
    train = _train_cfg(run_dir, mode, steps, BATCH * RANKS, "none") | (recipe or {})
    trainer.train(config_from_dict({**base, "train": train}), resume=resume)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "lens" / "lens.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], initial: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        # The runs must have moved the weights, and moved them the same way.
        assert not torch.equal(a[key], initial[key]) or a[key].abs().sum() == 0, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def reference(dumped, tmp_path_factory) -> dict[str, Path]:
    """Single-process runs (global batch, parity noise) of 2 steps per mode, and their step-0
    weights."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for mode in ("full", "frozen_base"):
            run_dir = tmp_path_factory.mktemp(f"ref_{mode}") / "run"
            _single(dumped, run_dir, mp, mode=mode)
            out[mode] = run_dir
        init = tmp_path_factory.mktemp("init") / "run"
        # lr 0 keeps step-0 weights: what "moved" is measured against.
        train = {**_train_cfg(init, "full", 1, BATCH * RANKS, "none"), "lr": 1e-12}
        train["lr_blocks"] = 0.0
        trainer.train(config_from_dict({**dumped, "train": train}))
        out["init"] = init
    return out


def test_ddp_two_ranks_match_one_process(dumped, reference, tmp_path):
    run_dir = tmp_path / "run"
    _torchrun(dumped, run_dir, strategy="ddp")
    _assert_close(_weights(run_dir), _weights(reference["full"]), _weights(reference["init"]))
    # Rank 0 alone logs and writes the lens; the checkpoint is sharded (DCP).
    assert ck.is_sharded(ck.latest_valid(run_dir))
    assert not list(run_dir.glob("rank_*"))


def test_fsdp_two_ranks_match_one_process(dumped, reference, tmp_path):
    run_dir = tmp_path / "run"
    _torchrun(dumped, run_dir, strategy="fsdp")
    _assert_close(_weights(run_dir), _weights(reference["full"]), _weights(reference["init"]))


def test_ddp_checkpoint_resumes_on_one_process(dumped, reference, tmp_path, monkeypatch):
    # frozen_base: only projections and prompts train, the shared base stays out of DDP.
    run_dir = tmp_path / "run"
    _torchrun(dumped, run_dir, strategy="ddp", mode="frozen_base", steps=1)
    path = ck.latest_valid(run_dir)
    assert path.name == "step_1" and ck.is_sharded(path)
    assert {p.name for p in path.glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    (run_dir / "lens").rename(run_dir / "lens_step1")
    _single(dumped, run_dir, monkeypatch, mode="frozen_base", resume=True)
    init = load_file(str(run_dir / "lens_step1" / "lens.safetensors"))
    _assert_close(_weights(run_dir), _weights(reference["frozen_base"]), init)


def test_one_process_checkpoint_resumes_on_fsdp_two_ranks(dumped, reference, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _single(dumped, run_dir, monkeypatch, steps=1)
    path = ck.latest_valid(run_dir)
    assert not ck.is_sharded(path)
    # The data position counts global batches of this size: a resume on another global batch
    # (here twice as large) rescales it to the same number of samples seen.
    state = ck.load_checkpoint(path).state
    assert state["global_batch"] == BATCH * RANKS
    assert state["train_state"]["batch_in_epoch"] == 2
    assert rescale_position(state, 2 * BATCH * RANKS)["batch_in_epoch"] == 1
    _torchrun(dumped, run_dir, strategy="fsdp", resume=True)
    assert ck.is_sharded(ck.latest_valid(run_dir))
    _assert_close(_weights(run_dir), _weights(reference["full"]), _weights(reference["init"]))


def test_deepspeed_zero2_smoke(dumped, reference, tmp_path):
    # grad_accum=2: DeepSpeed must update at every trainer step (its `step()` after every
    # micro-batch), so 2 steps on 2 ranks match 2 single-process steps on the global batch.
    run_dir = tmp_path / "run"
    config = Path(__file__).parents[2] / "config" / "ds_stage2.yaml"
    _torchrun(
        dumped,
        run_dir,
        strategy="deepspeed",
        mode="frozen_base",
        extra=(f"distributed.deepspeed_config={config}",),
    )
    path = ck.latest_valid(run_dir)
    assert path.name == "step_2" and ck.is_sharded(path) and (path / "deepspeed").is_dir()
    losses = [r["loss"] for r in MetricsFile(run_dir / METRICS).read() if r["kind"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (run_dir / "lens" / "lens.safetensors").is_file()
    _assert_close(
        _weights(run_dir), _weights(reference["frozen_base"]), _weights(reference["init"])
    )


# The readable-lens recipe in small (config/demo.yaml's shape): a warm start on the context and
# M's prediction, then GRPO from it in the same job; LoRA, A written after block 1, both
# rotations. D runs through `write`, `teacher_forced_logits` and (reference KL) swapped weights,
# E through `encode_ids`: none of them is `forward`, which is all FSDP gathers by itself.
RECIPE = {
    "objective": "grpo",
    "inject_layer": 1,
    "decoder_rotate": 1,
    "encoder_rotate": 1,
    "warm_start": {"steps": 2, "objective": "warm_start_predict", "alpha": 0.0},
    "predict": {"tokens": 1},
    "rl": {"samples": 2, "kl_ref": 0.5},
}


@pytest.fixture(scope="module")
def recipe_reference(dumped, tmp_path_factory) -> Path:
    """The recipe in one process on the global batch; the process group is left once, at the end."""
    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    with pytest.MonkeyPatch.context() as mp:
        left = []
        mp.setattr(dist, "teardown", lambda barrier=True: left.append(barrier))
        _single(dumped, run_dir, mp, mode="lora", recipe=RECIPE)
    assert left == [True]
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_readable_recipe_on_two_ranks_matches_one_process(
    dumped, recipe_reference, tmp_path, strategy
):
    run_dir = tmp_path / "run"
    config = Path(__file__).parents[2] / "config" / "ds_stage2.yaml"
    extra = (f"distributed.deepspeed_config={config}",) if strategy == "deepspeed" else ()
    _torchrun(dumped, run_dir, strategy=strategy, mode="lora", recipe=RECIPE, extra=extra)
    warm = Path(trainer.WARM_START_DIR) / "lens"
    for lens in (warm, Path("lens")):
        ours = load_file(str(run_dir / lens / "lens.safetensors"))
        theirs = load_file(str(recipe_reference / lens / "lens.safetensors"))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)
    # GRPO moved D away from its warm start (its samples of one activation differ), so the
    # comparison above covers D's policy gradient, not only E's regression.
    start = load_file(str(recipe_reference / warm / "lens.safetensors"))
    final = load_file(str(run_dir / "lens" / "lens.safetensors"))
    assert any(k.startswith("decoder.") and not torch.equal(start[k], final[k]) for k in start)
    # The reference KL read D against the warm start's D: 0 at step 1, above 0 once D had moved
    # (a swap that did nothing would read D against itself, 0 again).
    records = [r for r in MetricsFile(run_dir / METRICS).read() if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["kl_ref"] == pytest.approx(0.0, abs=1e-7) and records[1]["kl_ref"] > 1e-6
    # The logged terms are the global batch's (averaged over the ranks), as one process logs
    # them: the per-sample means (E's normalised MSE divides by its batch's mean norm: not one).
    alone = [r for r in MetricsFile(recipe_reference / METRICS).read() if r["kind"] == "train"]
    for ours, theirs in zip(records, alone, strict=True):
        for term in ("pg", "kl_ref", "reward", "grad_norm", "lr"):
            assert ours[term] == pytest.approx(theirs[term], rel=1e-3, abs=1e-5), term
        # A count the ranks agree on is logged as one process logs it, not averaged to a float.
        assert type(ours["bad_batches"]) is int and ours["bad_batches"] == theirs["bad_batches"]


def test_strategy_without_torchrun_is_refused(dumped, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    train = _train_cfg(tmp_path / "run", "frozen_base", 1, 4, "ddp")
    cfg = config_from_dict({**dumped, "train": train, "distributed": {"strategy": "ddp"}})
    with pytest.raises(LensError, match="must be launched with torchrun"):
        trainer.train(cfg)


def test_deepspeed_zero3_is_refused_in_one_sentence(dumped, tmp_path):
    shipped = Path(__file__).parents[2] / "config" / "ds_stage2.yaml"
    stage3 = tmp_path / "ds3.yaml"
    stage3.write_text(shipped.read_text().replace("stage: 2", "stage: 3"))
    cfg = config_from_dict({**dumped, "distributed": {"deepspeed_config": str(stage3)}})
    with pytest.raises(LensError, match="sets ZeRO stage 3, but the lens runs under stage 0, 1"):
        distributed.load_deepspeed_config(cfg, torch.device("cpu"))
    # DeepSpeed's old boolean form names no stage: refused in the same sentence, not a crash.
    stage3.write_text("zero_optimization: true\n")
    with pytest.raises(LensError, match="sets ZeRO stage True, but"):
        distributed.load_deepspeed_config(cfg, torch.device("cpu"))
    # A stage written as a string is the same stage.
    stage3.write_text("zero_optimization: {stage: '2'}\n")
    assert distributed.load_deepspeed_config(cfg, torch.device("cpu"))["zero_optimization"]
    cfg = config_from_dict({**dumped, "distributed": {"deepspeed_config": str(shipped)}})
    assert distributed.load_deepspeed_config(cfg, torch.device("cpu"))["zero_optimization"]


def test_gpu_bench_runs_tiny_on_cpu(capsys):
    import importlib.util

    path = Path(__file__).parents[2] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    results = [json.loads(line) for line in lines]
    # --tiny sweeps micro-batches 2 and 4, then reports the faster of the two.
    assert [r["part"] for r in results] == ["dump", "train", "train", "train_best", "profile"]
    assert [r["batch"] for r in results[1:3]] == [2, 4]
    assert all(r["samples_per_s"] > 0 for r in results[:3])
    best = max(results[1:3], key=lambda r: r["samples_per_s"])
    assert (results[3]["batch"], results[3]["samples_per_s"]) == (
        best["batch"],
        best["samples_per_s"],
    )
    profile = results[4]
    phases = {"forward", "backward", "optimizer", "D generate_soft", "E encode"}
    assert phases <= set(profile["phases"]) and profile["aten_ops_per_step"] > 0
    # D's generation, E and M's patched forward run inside the forward phase.
    inner = sum(profile["phases"][k]["cpu_ms"] for k in ("D generate_soft", "E encode"))
    assert 0 < inner <= profile["phases"]["forward"]["cpu_ms"]


class _AgreeingEngine:
    """An engine stand-in whose `agree` reports a cause from another rank from step `at` on."""

    sharded = False

    def __init__(self, state, at: int):
        self.state, self.at, self.seen = state, at, []

    def agree(self, cause):
        self.seen.append(cause)
        return cause or ("SIGTERM" if self.state.step >= self.at else None)


def test_sigterm_on_another_rank_stops_every_rank(monkeypatch):
    # Only "another rank" got SIGTERM: this one must still save at the same step and stop, or
    # one rank would enter the collective save while the other starts the next step.
    import threading
    from types import SimpleNamespace

    state = trainer.TrainState()
    engine = _AgreeingEngine(state, at=2)
    cfg = SimpleNamespace(train=SimpleNamespace(steps=5, val_every=100, ckpt_every=100))
    cfg.train.batch_size, cfg.train.grad_accum = 1, 1
    saved = []
    run = SimpleNamespace(cfg=cfg, state=state, engine=engine, logger=SimpleNamespace(info=print))

    def fake_step(run):
        run.state.step += 1
        return {}

    monkeypatch.setattr(trainer, "_train_step", fake_step)
    monkeypatch.setattr(trainer, "_maybe_log", lambda run, metrics: None)
    monkeypatch.setattr(trainer, "validate", lambda run: None)
    monkeypatch.setattr(trainer, "save", lambda run: saved.append(run.state.step) or Path("x"))
    assert trainer._loop(run, threading.Event()) is False
    assert saved == [2] and state.step == 2 and engine.seen == [None, None]


@pytest.mark.parametrize(
    ("loop", "raised", "barrier"),
    [
        # Every rank stops at the same step (SIGTERM agreed): they all reach the barrier.
        (lambda run, stop: False, trainer.TrainingStopped, True),
        # Interrupted anywhere: another rank may never reach a barrier.
        (lambda run, stop: (_ for _ in ()).throw(KeyboardInterrupt), KeyboardInterrupt, False),
    ],
)
def test_train_leaves_the_group_once_with_a_barrier_only_when_every_rank_stopped(
    dumped, tmp_path, monkeypatch, loop, raised, barrier
):
    left = []
    monkeypatch.setattr(trainer, "_loop", loop)
    monkeypatch.setattr(dist, "teardown", lambda barrier=True: left.append(barrier))
    train = _train_cfg(tmp_path / "run", "frozen_base", 1, 4, "none")
    with pytest.raises(raised):
        trainer.train(config_from_dict({**dumped, "train": train}))
    assert left == [barrier]


def test_teardown_runs_when_training_raises(dumped, tmp_path, monkeypatch):
    calls = []

    def failing_loop(run, stop):
        raise LensError("too many bad batches")

    built = []
    build = trainer._build_run

    def build_and_keep(*args):
        built.append(build(*args))
        return built[-1]

    monkeypatch.setattr(trainer, "_loop", failing_loop)
    monkeypatch.setattr(trainer, "_build_run", build_and_keep)
    # What the run still holds when the group goes: its models must already be dropped.
    monkeypatch.setattr(
        dist, "teardown", lambda barrier=True: calls.append((built[0].model, barrier))
    )
    train = _train_cfg(tmp_path / "run", "frozen_base", 1, 4, "none")
    with pytest.raises(LensError, match="too many bad batches"):
        trainer.train(config_from_dict({**dumped, "train": train}))
    assert calls == [(None, False)]
    assert built[0].lens is None and built[0].engine is None and built[0].optimizer is None
