"""aten ops launched and host syncs per lens training step, counted with torch.profiler (CPU proxy).

Run: .venv/bin/python bench/step_ops.py [--tiny] [--objectives plan-full,plan-frozen_base,...]

On a GPU every leaf aten op is (at least) one kernel launch, and a host sync stalls the launch
queue; both are counted on the CPU, where they can be measured without a GPU. The model is a
random-weight Llama of SmolLM2-135M's shape (bench/gpu.py's `build_model`, fp32 on CPU), batch 16,
T_text 8, contexts of 64 tokens. One step is what the trainer runs per optimizer step: zero_grad,
the objective's forward, backward, gradient clipping and the AdamW step, through the engine.

Counted per step (after one warm-up step):
- `aten_ops`: every aten op the profiler records, nested ones included; `top_ops`: those called
  from Python or autograd (not from inside another aten op); `kernel_ops`: leaves (calling no
  other aten op) that are not views or allocations, roughly one GPU kernel launch each, plus
  inductor's fused kernels where blocks are compiled (`fused_kernels`, also counted alone).
  The `plan-full-compiled` case sets `train.compile` and spends minutes compiling before it counts.
- Attention's row split (`models/attention.py`) is a CPU measure and is off here: the counts are
  what a GPU runs.
- `syncs`: ops that make the host wait for the device: `aten::_local_scalar_dense` (`.item()`,
  `float(t)`, `bool(t)`), `aten::nonzero` and `aten::masked_select` (output size read back), plus
  Python calls of `Tensor.tolist`/`.numpy`/`.cpu` (on a CPU these never reach the profiler). Reads
  inside a fused optimizer kernel are left out: the CPU kernel reads each step count, the CUDA
  one keeps it on the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

# Inductor's fused CPU kernels (train.compile) show in the profiler only with this set; each is
# one launch, as a fused kernel would be on a GPU. Set before torch reads it.
os.environ.setdefault("TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from gpu import build_model  # noqa: E402

from consistency_lens.config import config_from_dict  # noqa: E402
from consistency_lens.data.collate import CollateFn  # noqa: E402
from consistency_lens.models import attention  # noqa: E402
from consistency_lens.models.lens import ConsistencyLens  # noqa: E402
from consistency_lens.training.distributed import wrap_for_strategy  # noqa: E402
from consistency_lens.training.objectives import build_objective, step_info  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")
# Leaves that launch no kernel on a GPU (metadata only, or an allocation).
NO_KERNEL = {
    "aten::as_strided",
    "aten::view",
    "aten::_unsafe_view",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::empty",
    "aten::empty_strided",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::_reshape_alias",
}
_PY_SYNCS = ("tolist", "numpy", "cpu")
# The readable recipe of config/demo.yaml (prompt, inject_layer, GRPO settings), SmolLM2 shape.
_DEMO_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n<embed> ->"
CASES: dict[str, dict] = {
    "plan-full": {"mode": "full"},
    "plan-full-compiled": {"mode": "full", "compile": True},
    "plan-frozen_base": {"mode": "frozen_base"},
    "warm_start": {
        "mode": "lora",
        "objective": "warm_start",
        "inject_layer": 3,
        "prompt": _DEMO_PROMPT,
        "encoder_prompt": "In short:",
        "alpha": {"kind": "constant", "start": 0.0},
    },
    "grpo": {
        "mode": "lora",
        "objective": "grpo",
        "inject_layer": 3,
        "prompt": _DEMO_PROMPT,
        "encoder_prompt": "In short:",
        "rl": {"samples": 4, "temperature": 1.0, "kl_ref": 0.3, "fluency_reward": 0.5},
        "mse_weight": 2000.0,
        "alpha": {"kind": "constant", "start": 0.2},
    },
}


@contextlib.contextmanager
def counting_python_syncs(counts: Counter) -> Iterator[None]:
    """Count calls of the Tensor methods that copy device data to the host."""
    saved = {name: getattr(torch.Tensor, name) for name in _PY_SYNCS}

    def wrap(name: str, method: Callable) -> Callable:
        def counted(self, *args, **kwargs):
            counts[f"Tensor.{name}"] += 1
            return method(self, *args, **kwargs)

        return counted

    for name, method in saved.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def build_step(case: str, tiny: bool, batch: int, t_text: int, context: int) -> Callable[[], None]:
    """One optimizer step of `case` (a key of CASES) on a fixed random batch."""
    device = torch.device("cpu")
    loaded = build_model("tiny" if tiny else "smollm2-135m", device, torch.float32)
    layers = loaded.model.config.num_hidden_layers
    train = {**CASES[case], "t_text": t_text, "batch_size": batch, "precision": "fp32"}
    if "inject_layer" in train:
        train["inject_layer"] = min(train["inject_layer"], layers - 1)
    cfg = config_from_dict(
        {"model": "random", "layer": min(15, layers - 1), "device": "cpu", "train": train}
    )
    lens = ConsistencyLens(cfg, loaded)
    engine = wrap_for_strategy(lens, cfg)
    objective = build_objective(lens, cfg)
    info = step_info(type(objective), cfg, 0)
    vocab, d = loaded.model.config.vocab_size, loaded.parts.d_model
    gen = torch.Generator().manual_seed(0)
    items = [
        {
            "input_ids_A": torch.randint(1, vocab, (context,), generator=gen),
            "A": torch.randn(d, generator=gen),
            "input_ids_A_prime": torch.randint(1, vocab, (context,), generator=gen),
            "A_prime": torch.randn(d, generator=gen),
        }
        for _ in range(batch)
    ]
    data = CollateFn()(items)

    def step() -> None:
        engine.zero_grad()
        with record_function("phase:forward"):
            out = engine.model(data, objective, info)
        with record_function("phase:backward"):
            engine.backward(out.loss)
        with record_function("phase:clip"):
            engine.clip_grad_norm(1.0)
        with record_function("phase:optimizer"):
            engine.step()

    return step


def count_step(step: Callable[[], None]) -> dict:
    """aten ops, leaf ops and host syncs of one call of `step` (after a warm-up call)."""
    step()
    py: Counter = Counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof, counting_python_syncs(py):
        step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def ancestors(e) -> Iterator:
        while e.cpu_parent is not None:
            e = e.cpu_parent
            yield e

    top = [e for e in events if not any(a.name.startswith("aten::") for a in ancestors(e))]
    leaves = [e for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    # Inductor's fused kernels (`graph_<n>_cpp_fused_...`) are not aten ops but launch one each.
    fused = [e for e in prof.events() if "cpp_fused" in e.name]
    kernels = [e for e in leaves if e.name not in NO_KERNEL]
    synced = [
        e
        for e in events
        if e.name in SYNC_OPS and not any(a.name.startswith("aten::_fused_") for a in ancestors(e))
    ]
    syncs = Counter(e.name for e in synced) + py
    # Backward runs on autograd's own thread: ops are assigned to a phase by time, not nesting.
    spans = [
        (e.name.removeprefix("phase:"), e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.name.startswith("phase:")
    ]
    phases: Counter = Counter()
    for e in events:
        start = e.time_range.start
        phases[next((n for n, a, b in spans if a <= start <= b), "other")] += 1
    return {
        "aten_ops": len(events),
        "top_ops": len(top),
        "kernel_ops": len(kernels) + len(fused),
        "fused_kernels": len(fused),
        "phases": dict(phases),
        "host_syncs": sum(syncs.values()),
        "syncs": dict(syncs),
        "top_kernels": dict(Counter(e.name for e in kernels).most_common(6)),
    }


def main(argv: list[str] | None = None) -> None:
    """Print one JSON line per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--objectives", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--t-text", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    args = parser.parse_args(argv)
    # Count what a GPU runs: attention's row split is used on CPUs only (`SPLIT_DEVICES`).
    attention.SPLIT_DEVICES = frozenset()
    torch.manual_seed(0)
    for case in args.objectives.split(","):
        step = build_step(case, args.tiny, args.batch, args.t_text, args.context)
        print(json.dumps({"case": case, **count_step(step)}), flush=True)


if __name__ == "__main__":
    main()
