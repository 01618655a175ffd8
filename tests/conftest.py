"""Shared fixtures: tiny random-weight models saved as real HF directories, an offline tokenizer."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import socket
from pathlib import Path
from unittest import mock

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.profiler import ProfilerActivity, profile
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = (
    "the nation economy congress people war peace law tax trade union state year government "
    "public we our must will have been which their this that from with for are not all great"
).split()


# Ops that make the host wait for the device, and the Python reads that reach no aten op on a
# CPU (what `bench/step_ops.py` counts).
SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item")
PY_READS = ("tolist", "numpy", "cpu")


@contextlib.contextmanager
def no_host_reads():
    """Fail if the code inside reads a tensor back to the host."""
    reads: list[str] = []

    def counted(name: str):
        method = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return method(self, *args, **kwargs)

        return read

    with contextlib.ExitStack() as stack:
        for name in PY_READS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, counted(name)))
        prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU]))
        yield
    assert [e.name for e in prof.events() if e.name in SYNCS] + reads == []


@functools.cache
def _plain_sdpa():
    """transformers' own `sdpa`, as the lens's wrapper found it (read before any test swaps it)."""
    from transformers import AttentionInterface

    import consistency_lens.models.attention  # noqa: F401  (installs the wrapper)

    return AttentionInterface()["sdpa"].inner


def record_sdpa(monkeypatch, split: bool) -> list[tuple[int, bool]]:
    """Route transformers' `sdpa` through a recorder, with the lens's row split (`split`) or as
    plain `sdpa`; returns (batch, whether it builds a graph) of each later call to plain `sdpa`."""
    from transformers import AttentionInterface

    from consistency_lens.models.attention import split_grad_rows

    plain = _plain_sdpa()
    calls: list[tuple[int, bool]] = []

    def inner(*args, **kwargs):
        graphed = torch.is_grad_enabled() and any(t.requires_grad for t in args[1:4])
        calls.append((args[1].shape[0], graphed))
        return plain(*args, **kwargs)

    recorded = split_grad_rows(inner) if split else inner
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", recorded)
    return calls


def make_text(seed: int, n_words: int) -> str:
    """Deterministic pseudo-English text."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def cli_error(capsys, argv: list[str], *, sole_error_line: bool = False) -> str:
    """Run the CLI expecting exit 2 and no traceback; return stderr's last line."""
    from consistency_lens.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after transformers' loading progress bars
    if sole_error_line:
        assert line.startswith("error: ") and err.count("error: ") == 1
    return line


def signal_after_step(monkeypatch, sig: int, step: int = 3):
    """Make `train` send `sig` to this process right after optimizer step `step`; return the real step."""
    from consistency_lens.training import trainer

    real = trainer._train_step

    def step_then_signal(run):
        metrics = real(run)
        if run.state.step == step:
            os.kill(os.getpid(), sig)
        return metrics

    monkeypatch.setattr(trainer, "_train_step", step_then_signal)
    return real


def batch_of(lens, seqs: list[torch.Tensor], seqs_prime: list[torch.Tensor]):
    """A Batch of left-padded `seqs` and `seqs_prime` with M's activations for each."""
    from consistency_lens.data.collate import Batch
    from consistency_lens.models.inputs import left_pad

    ids, mask = left_pad(seqs, 0)
    ids_p, mask_p = left_pad(seqs_prime, 0)
    return Batch(
        ids,
        mask,
        lens.orig.activations(ids, mask),
        ids_p,
        mask_p,
        lens.orig.activations(ids_p, mask_p),
    )


def objective_lens(path: Path, **train: object):
    """A layer-1 fp32 CPU lens on the model at `path` (t_text 3 unless `train` says otherwise)."""
    from consistency_lens.config import LensConfig
    from consistency_lens.models.lens import ConsistencyLens

    train.setdefault("t_text", 3)
    cfg = LensConfig(model=str(path), device="cpu", model_dtype="float32", layer=1, train=train)
    return ConsistencyLens.build(cfg)


def objective_batch(lens, lengths: tuple[int, ...] = (6, 9, 4)):
    """The fixed seed-1 batch of the objective tests; the primed sequences are the reversed ones."""
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 320, (n,), generator=gen) for n in lengths]
    return batch_of(lens, seqs, [s.flip(0) for s in seqs])


def assert_e_alone_learns(lens, objective, batch, out, mse_weight: float) -> None:
    """For an E-only objective (α 0 in `out`): its loss trains E and never D, and at α 0.5 the
    KL at P of E's reconstruction joins the loss as `mse_weight · mse_e + 0.5 · kl_e`."""
    from consistency_lens.training.objectives import step_info

    out.loss.backward()
    grads = {n: p.grad for n, p in lens.trainable_parameters().items()}
    assert all(g is None for n, g in grads.items() if n.startswith("decoder."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "encoder." in n)
    lens.cfg.train.alpha.start = 0.5
    out = objective(lens, batch, step_info(type(objective), lens.cfg, 0))
    mse_e, kl_e = float(out.terms["mse_e"].detach()), float(out.terms["kl_e"].detach())
    assert kl_e > 0
    assert float(out.loss.detach()) == pytest.approx(mse_weight * mse_e + 0.5 * kl_e, rel=1e-5)


def dumped_eval_config(root: Path, model: Path, corpus: Path, **over: object):
    """Dump a 24-token config under `root` for a 3-token-text lens run in `root/run`; return it."""
    from consistency_lens.config import config_from_dict
    from consistency_lens.data.dump import dump_activations

    train = {"run_dir": str(root / "run"), "t_text": 3, "prompt": "thought <embed> is"}
    cfg = config_from_dict(tiny_dump_config(root, model, corpus, seq_len=24, train=train, **over))
    dump_activations(cfg)
    return cfg


def split_of(cfg, split: str) -> Path:
    """The directory of config `cfg`'s dump split `split` (`data.layout.split_dir` on its fields)."""
    from consistency_lens.data.layout import split_dir

    return split_dir(cfg.output_dir, cfg.model, cfg.layer, cfg.corpus, split)


def tiny_dump_config(root: Path, model: Path, corpus: Path, **over: object) -> dict:
    """Config dict of a tiny fp32 CPU dump under `root`; a test passes only what it varies."""
    return {
        "model": str(model),
        "corpus": str(corpus),
        "layer": 1,
        "seq_len": 32,
        "p_min": 4,
        "num_samples": 24,
        "val_samples": 8,
        "batch_size": 8,
        "shard_size": 16,
        "seed": 0,
        "dtype": "float32",
        "model_dtype": "float32",
        "device": "cpu",
        "output_dir": str(root / "acts"),
        "cache_dir": str(root / "corpus"),
        **over,
    }


def tiny_train_config(run_dir: Path, **over: object) -> dict:
    """`train` section of a tiny run in `run_dir`: one step of 4 samples writing 2-token texts,
    validating, checkpointing and logging every step; a test passes only what it varies."""
    return {
        "run_dir": str(run_dir),
        "t_text": 2,
        "steps": 1,
        "batch_size": 4,
        "val_every": 1,
        "val_batches": 1,
        "ckpt_every": 1,
        "log_every": 1,
        "prompt": "A <embed> is",
        **over,
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a torchrun rendezvous: a fixed
    port fails when two suites (the capability sweep) or another program use it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny matrices gain nothing from threads, and spinning OpenMP threads on a busy 2-core
    machine make each step many times slower. `CONSISTENCY_LENS_TEST_THREADS` sets another count,
    so that `make test-sweep` can prove no float check depends on the threads' reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("CONSISTENCY_LENS_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_intra_op_thread():
    """One thread for a test of bit-for-bit equality between two batchings of the same rows:
    with several threads a CPU kernel partitions its work (and orders its sums) by the tensor's
    size, so two batchings agree only to rounding, which no bitwise claim survives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained offline on the fixture vocabulary, saved as an HF dir."""
    out = tmp_path_factory.mktemp("tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([make_text(i, 200) for i in range(20)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return out


def save_with_tokenizer(model: torch.nn.Module, tokenizer_dir: Path, out: Path) -> Path:
    """Save `model` and the fixture tokenizer as one HF model directory `out`."""
    model.save_pretrained(out)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 4-block random Llama (d=64) with the fixture tokenizer."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return save_with_tokenizer(
        LlamaForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("llama")
    )


@pytest.fixture(scope="session")
def narrow_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-block random Llama of width 32 (half the other fixtures'), for width mismatches."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return save_with_tokenizer(
        LlamaForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("narrow_llama")
    )


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 3-block random GPT-2 (d=64) with the fixture tokenizer."""
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=320,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    return save_with_tokenizer(GPT2LMHeadModel(cfg), tokenizer_dir, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A directory of 12 small .txt documents."""
    out = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (out / f"doc_{i:02d}.txt").write_text(make_text(100 + i, 120))
    return out


def decoder_full_forward(dec, loaded, prompt: str, acts: torch.Tensor, ids: torch.Tensor):
    """Logits with which D wrote each of `ids` (B, T), from one uncached forward over prompt + text.

    Without `inject_layer` the projected A is the slot's input embedding; with it the slot reads
    D's placeholder embedding and A overwrites its state after block k (a hook, no cache).
    """
    import contextlib

    from consistency_lens.models.decoder import prompt_token_ids
    from consistency_lens.models.hooks import replace_at

    left, right = prompt_token_ids(loaded.tokenizer, prompt)
    batch = acts.shape[0]
    projected = dec.proj(acts)
    slot = projected.unsqueeze(1) if dec.slot is None else dec.slot.expand(batch, -1, -1)
    embeds = torch.cat(
        [
            dec.prompt_left.expand(batch, -1, -1),
            slot,
            dec.prompt_right.expand(batch, -1, -1),
            loaded.parts.embed_ids(ids[:, :-1]),
        ],
        dim=1,
    )
    hook = contextlib.nullcontext()
    if dec.slot is not None:
        hook = replace_at(loaded.parts.blocks[dec.inject_layer], len(left), projected)
    with hook:
        logits = loaded.model(inputs_embeds=embeds).logits
    start = len(left) + 1 + len(right) - 1
    return logits[:, start : start + ids.shape[1]]


def assert_dump_is_block_output(model_dir: Path, cfg, split: Path) -> int:
    """Check every sample of a dumped `split`: A is `hidden_states[L + 1][P]` of a plain full
    forward over its context, and P lies in the configured range; return the sample count."""
    from consistency_lens.data.dataset import ActivationDataset
    from consistency_lens.models.loading import load_model

    model = load_model(str(model_dir), device="cpu", dtype="float32").model
    ds = ActivationDataset(split, seed=0)
    for i in range(len(ds)):
        ids, act = ds.sample(i)
        pos = len(ids) - 1
        assert cfg.p_min <= pos <= cfg.seq_len - 2
        with torch.no_grad():
            hidden = model(ids[None], output_hidden_states=True).hidden_states
        torch.testing.assert_close(act, hidden[cfg.layer + 1][0, pos], rtol=1e-5, atol=1e-5)
    return len(ds)


class WordTokenizer:
    """One word per token id, decoded with a leading space like a byte-level BPE; words written
    `<|...|>` are special tokens (dropped under `skip_special_tokens`, as a HF tokenizer does)."""

    def __init__(self, words):
        self.words = list(words)

    def decode(self, ids, skip_special_tokens=False):
        words = [self.words[i] for i in ids]
        if skip_special_tokens:
            words = [w for w in words if not w.startswith("<|")]
        return "".join(" " + w for w in words)


@pytest.fixture
def padded_passes(monkeypatch):
    """M's passes over a padded batch run padded, as on an accelerator: packing
    (`models.inputs.pack`) runs on a CPU only, where it reads the rows' lengths back."""
    from consistency_lens.models import inputs

    monkeypatch.setattr(inputs, "PACK_DEVICES", frozenset())
