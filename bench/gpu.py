"""GPU figures: dump throughput of a Llama-2-7B-shaped model, lens training step throughput and MFU.

Run on one H100:  python bench/gpu.py            (all parts; random weights measure speed fine)
                  python bench/gpu.py --part dump --batch 64
Smoke test (CPU): python bench/gpu.py --tiny      (tiny shapes, a few iterations, same code path)

Dump: the early-exit forward of the dump (blocks 0..L only) on bf16 sequences of `--seq` tokens,
plus the gather of each row's activation at P and its copy to the host, as `consistency-lens dump`
does. Train: one optimizer step of the lens in `full` mode (D and E trainable copies, M frozen)
with bf16 autocast, at each micro-batch of `--train-batches`, then the best (`train_best`); MFU
counts the dense matmul FLOPs of D, E and M (attention scores left out, as the texts are short)
against `--peak-tflops` (H100 SXM bf16 dense: 989). Profile: where one step's time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from consistency_lens.config import config_from_dict
from consistency_lens.data.collate import CollateFn
from consistency_lens.models.adapter import find_parts
from consistency_lens.models.hooks import run_until
from consistency_lens.models.lens import ConsistencyLens
from consistency_lens.models.loading import LoadedModel
from consistency_lens.training.distributed import wrap_for_strategy
from consistency_lens.training.objectives import build_objective, step_info

# Shapes of the real models (LlamaConfig fields); weights are random.
SHAPES = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["dump", "train", "profile", "all"], default="all")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: a smoke test")
    parser.add_argument("--seq", type=int, default=256, help="dump sequence length")
    parser.add_argument("--layer", type=int, default=16, help="dump layer L")
    parser.add_argument("--batch", type=int, default=64, help="dump batch size")
    parser.add_argument(
        "--train-batch", type=int, default=16, help="lens micro-batch size of the profile"
    )
    parser.add_argument(
        "--train-batches",
        default="16,64,256",
        help="micro-batch sizes the train part sweeps (comma-separated); it reports the best",
    )
    parser.add_argument("--t-text", type=int, default=8, help="tokens D writes per activation")
    parser.add_argument("--context", type=int, default=64, help="tokens 0..P of input_ids_A")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (after warmup)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    parser.add_argument(
        "--compile", action="store_true", help="train.compile: every block of D, E and M compiled"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq, args.layer, args.batch, args.train_batch = 32, 1, 4, 2
        args.train_batches = "2,4"
        args.t_text, args.context, args.iters = 2, 8, 2
    return args


def _tokenizer() -> PreTrainedTokenizerFast:
    # Offline: only the decoder prompt is tokenized, so any small byte-level BPE will do.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["a hidden thought in words is about the budget"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A frozen random-weight Llama of the named shape, as the loader would return it."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    return LoadedModel(model, _tokenizer(), find_parts(model), shape, f"random-{shape}")


def _timed(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds per call of `fn` after one warmup call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def bench_dump(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Dump samples/s: early-exit forward to block L, gather at P, copy to the host."""
    shape = "tiny" if args.tiny else "llama2-7b"
    loaded = build_model(shape, device, dtype)
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.seq), device=device)
    positions = torch.randint(
        10 if not args.tiny else 4, args.seq - 1, (args.batch,), device=device
    )
    rows = torch.arange(args.batch, device=device)
    block = loaded.parts.blocks[args.layer]

    @torch.inference_mode()
    def step() -> torch.Tensor:
        hidden = run_until(loaded.model, block, input_ids=ids, use_cache=False)
        return hidden[rows, positions].float().cpu()

    seconds = _timed(step, args.iters, device)
    return {
        "part": "dump",
        "shape": shape,
        "batch": args.batch,
        "seq": args.seq,
        "layer": args.layer,
        "samples_per_s": args.batch / seconds,
    }


def _lens_flops(lens: ConsistencyLens, batch: int, prompt: int, t_text: int, context: int) -> float:
    """Dense matmul FLOPs of one training micro-batch (2 per multiply-add, backward = 2x forward)."""

    def matmul_params(model: torch.nn.Module, with_head: bool) -> int:
        parts = find_parts(model)
        blocks = sum(p.numel() for b in parts.blocks for p in b.parameters())
        head = parts.embed.weight.numel() if with_head else 0
        return blocks + head

    n_d = matmul_params(lens.decoder.model, True)
    n_e = matmul_params(lens.encoder.model, False)
    n_m = matmul_params(lens.orig.model, True)
    pairs = 2 * batch  # A and A' both go through D and E
    d_tokens = pairs * (prompt + t_text)
    e_tokens = pairs * t_text
    # M: the shared prefix once, two single patched tokens, D's text for loss_lm; the patched
    # token also runs backward (to Â), counted as two more forwards.
    m_tokens = batch * (context + 2 + t_text + 2)
    return 6 * (n_d * d_tokens + n_e * e_tokens) + 2 * n_m * m_tokens


def _full_mode_step(
    args: argparse.Namespace, shape: str, device: torch.device, dtype: torch.dtype
) -> tuple[ConsistencyLens, Callable[[], None], object]:
    """A `full`-mode lens on random weights, its training step, and the step's phases as hooks."""
    loaded = build_model(shape, device, dtype)
    d = loaded.parts.d_model
    prompt = "Here is a hidden thought: <embed>. In words, it is about"
    cfg = config_from_dict(
        {
            "model": shape,
            "layer": min(args.layer, loaded.model.config.num_hidden_layers - 1),
            "device": str(device),
            "train": {
                "mode": "full",
                "t_text": args.t_text,
                "batch_size": args.train_batch,
                "prompt": prompt,
                "precision": "bf16" if device.type == "cuda" else "fp32",
                "compile": args.compile,
            },
        }
    )
    lens = ConsistencyLens(cfg, loaded)
    engine = wrap_for_strategy(lens, cfg)
    objective = build_objective(lens, cfg)  # train.objective, as the trainer picks it
    info = step_info(type(objective), cfg, 0)
    vocab = loaded.model.config.vocab_size
    items = [
        {
            "input_ids_A": torch.randint(1, vocab, (args.context,)),
            "A": torch.randn(d),
            "input_ids_A_prime": torch.randint(1, vocab, (args.context,)),
            "A_prime": torch.randn(d),
        }
        for _ in range(args.train_batch)
    ]
    batch = CollateFn()(items).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def phase(name: str) -> contextlib.AbstractContextManager:
        return torch.profiler.record_function(f"phase:{name}")

    def step() -> None:
        engine.zero_grad()
        with autocast, phase("forward"):
            out = engine.model(batch, objective, info)
        with phase("backward"):
            engine.backward(out.loss)
        with phase("optimizer"):
            engine.clip_grad_norm(1.0)
            engine.step()

    return lens, step, objective


def bench_train(
    args: argparse.Namespace, shape: str, device: torch.device, dtype: torch.dtype
) -> dict:
    """Optimizer steps/s, samples/s and MFU of the lens in `full` mode."""
    lens, step, objective = _full_mode_step(args, shape, device, dtype)
    seconds = _timed(step, args.iters, device)
    prompt = lens.cfg.train.prompt
    prompt_tokens = len(lens.orig.loaded.tokenizer(prompt.replace("<embed>", ""))["input_ids"]) + 1
    flops = _lens_flops(lens, args.train_batch, prompt_tokens, args.t_text, args.context)
    return {
        "part": "train",
        "shape": shape,
        "mode": "full",
        "objective": objective.name,
        "batch": args.train_batch,
        "t_text": args.t_text,
        "steps_per_s": 1 / seconds,
        "samples_per_s": args.train_batch / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / (args.peak_tflops * 1e12),
    }


def sweep_train(
    args: argparse.Namespace, shape: str, device: torch.device, dtype: torch.dtype
) -> dict:
    """`bench_train` at each micro-batch of `--train-batches`; the best samples/s and MFU."""
    results = []
    for batch in (int(b) for b in args.train_batches.split(",")):
        try:
            result = bench_train(
                argparse.Namespace(**{**vars(args), "train_batch": batch}), shape, device, dtype
            )
        except torch.OutOfMemoryError:
            result = {"part": "train", "shape": shape, "batch": batch, "error": "out of memory"}
        print(json.dumps(result), flush=True)
        results.append(result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fitted = [r for r in results if "error" not in r]
    if not fitted:
        return {
            "part": "train_best",
            "shape": shape,
            "error": "every micro-batch ran out of memory",
        }
    best = max(fitted, key=lambda r: r["samples_per_s"])
    return {
        "part": "train_best",
        **{k: best[k] for k in ("shape", "batch", "samples_per_s", "mfu")},
    }


# Host syncs: the calls that make the CPU wait for the device (or read a device scalar).
_SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense")


def _phase_hooks(lens: ConsistencyLens) -> None:
    """Label D's generation, E, M's patched forward and M's token logits in profiler traces."""
    from consistency_lens.training.objectives import plan

    def labelled(name: str, fn: Callable) -> Callable:
        def run(*a: object, **kw: object) -> object:
            with torch.profiler.record_function(f"phase:{name}"):
                return fn(*a, **kw)

        return run

    lens.decoder.generate_soft = labelled("D generate_soft", lens.decoder.generate_soft)
    lens.encoder.forward = labelled("E encode", lens.encoder.forward)
    lens.orig.token_logits = labelled("M token logits (loss_lm)", lens.orig.token_logits)
    plan.patched_kl = labelled("M patched forward (KL)", plan.patched_kl)


def profile_train(
    args: argparse.Namespace, shape: str, device: torch.device, dtype: torch.dtype
) -> dict:
    """Where one `full`-mode step's time goes: per-phase times, ops, kernels and host syncs."""
    lens, step, _ = _full_mode_step(args, shape, device, dtype)
    _phase_hooks(lens)
    step()
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    steps = 3
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    phases, syncs, aten_ops, kernels = {}, {}, 0, 0
    for evt in events:
        if evt.key.startswith("phase:"):
            # On CUDA each range has two entries: the host's, whose device time is the sum of the
            # kernels it launched, and the GPU annotation, whose device time is the range's span
            # on the GPU timeline (idle gaps included).
            phase = phases.setdefault(
                evt.key[6:], {"cpu_ms": 0.0, "kernel_ms": 0.0, "gpu_span_ms": 0.0}
            )
            device_ms = getattr(evt, "device_time_total", 0.0) / 1e3 / steps
            if evt.device_type == torch.autograd.DeviceType.CPU:
                phase["cpu_ms"] += evt.cpu_time_total / 1e3 / steps
                phase["kernel_ms"] += device_ms
            else:
                phase["gpu_span_ms"] += device_ms
            continue
        if evt.key in _SYNC_OPS:
            syncs[evt.key] = evt.count / steps
        if evt.key.startswith("aten::"):
            aten_ops += evt.count
        annotation = getattr(evt, "is_user_annotation", False)
        if evt.device_type == torch.autograd.DeviceType.CUDA and not annotation:
            kernels += evt.count
    return {
        "part": "profile",
        "shape": shape,
        "batch": args.train_batch,
        "t_text": args.t_text,
        "wall_ms_per_step": wall * 1e3,
        "phases": phases,
        "aten_ops_per_step": aten_ops / steps,
        "device_kernels_per_step": kernels / steps,
        "host_syncs_per_step": syncs,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the selected parts and print one JSON line per figure."""
    args = parse_args(argv)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py needs a CUDA GPU; use --tiny for a CPU smoke test.")
        device, dtype = torch.device("cuda"), torch.bfloat16
        print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    if args.part in ("dump", "all"):
        print(json.dumps(bench_dump(args, device, dtype)), flush=True)
    if args.part in ("train", "all"):
        for shape in ("tiny",) if args.tiny else ("smollm2-135m", "llama-1b"):
            print(json.dumps(sweep_train(args, shape, device, dtype)), flush=True)
    if args.part in ("profile", "all"):
        shape = "tiny" if args.tiny else "smollm2-135m"
        print(json.dumps(profile_train(args, shape, device, dtype)), flush=True)


if __name__ == "__main__":
    main()
