"""Dump integrity: a rerun never resumes stale data, train and val never share a sequence, and one
process owns a dump directory at a time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, split_of, tiny_dump_config
from safetensors.torch import load_file

import consistency_lens.data.dump as dump_mod
from consistency_lens.config import config_from_dict
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError


def _base(root: Path, model: Path, corpus: Path, **over) -> dict:
    return tiny_dump_config(
        root, model, corpus, seq_len=24, p_min=3, num_samples=24, shard_size=8, **over
    )


def _argv(base: dict) -> list[str]:
    return ["dump", *(f"{k}={v}" for k, v in base.items())]


def _snapshot(root: Path, locks: bool = False) -> dict:
    """Every file below `root` with its bytes, inode and mtime: proves nothing was touched.

    A refused rerun still held the `.lock` files (its PID in them) while it checked, so they are
    compared only where `locks` says so (the rerun refused because another process holds them).
    """
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and (locks or path.name != ".lock"):
            stat = path.stat()
            out[str(path.relative_to(root))] = (path.read_bytes(), stat.st_ino, stat.st_mtime_ns)
    return out


def _contents(directory: Path) -> dict:
    """A split's shards (as lists) and progress file; metadata.json records paths, so it differs."""
    out = {}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            out[path.name] = {k: v.tolist() for k, v in load_file(path).items()}
        elif path.name != "metadata.json":
            out[path.name] = path.read_bytes()
    return out


def _seq_index(directory: Path) -> list[int]:
    return [
        i
        for shard in sorted(directory.glob("shard_*.safetensors"))
        for i in load_file(shard)["seq_index"].tolist()
    ]


def _contexts(directory: Path) -> set[tuple[int, ...]]:
    """Each sample's token context (its sequence up to P)."""
    out = set()
    for shard in sorted(directory.glob("shard_*.safetensors")):
        tensors = load_file(shard)
        ids, offsets = tensors["input_ids"].tolist(), tensors["offsets"].tolist()
        out |= {tuple(ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)}
    return out


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, n_shards: int) -> None:
    """Make the dump die right after writing its `n_shards`-th shard."""
    real, written = dump_mod._write_shard, []

    def write(path, tensors):
        digest = real(path, tensors)
        written.append(path)
        if len(written) == n_shards:
            raise _Interrupt
        return digest

    monkeypatch.setattr(dump_mod, "_write_shard", write)


def _interrupted_dump(monkeypatch, base: dict) -> Path:
    """Dump train's first shard, die while writing its second; returns the output root."""
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(_Interrupt):
            dump_activations(config_from_dict(base))
    train = split_of(config_from_dict(base), "train")
    assert len(list(train.glob("shard_*.safetensors"))) == 2
    assert '"shard_00000.safetensors"' in (train / "progress.json").read_text()
    return Path(base["output_dir"])


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"val_samples": 4}, "val_samples"),
        ({"val_samples": 12}, "val_samples"),
        ({"num_samples": 16}, "num_samples"),
        ({"seed": 1}, "seed"),
        ({"p_min": 5}, "p_min"),
        ({"positions_per_sequence": 2}, "positions_per_sequence"),
    ],
)
def test_resume_with_other_sampling_settings_is_refused_and_writes_nothing(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch, capsys, change, key
):
    base = _base(tmp_path, tiny_llama_dir, corpus_dir)
    root = _interrupted_dump(monkeypatch, base)
    before = _snapshot(root)
    line = cli_error(capsys, _argv({**base, **change}), sole_error_line=True)
    assert f"made with {key}=" in line and "delete that directory" in line
    assert _snapshot(root) == before


def test_a_dump_interrupted_before_positions_per_sequence_existed_resumes_as_one(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch
):
    """A progress header written before the setting existed meant one position per sequence:
    the rerun resumes it (and ends equal to a lone run), where any other value is refused."""
    base = _base(tmp_path / "old", tiny_llama_dir, corpus_dir)
    _interrupted_dump(monkeypatch, base)
    cfg = config_from_dict(base)
    progress = split_of(cfg, "train") / "progress.json"
    state = json.loads(progress.read_text())
    del state["header"]["positions_per_sequence"]
    progress.write_text(json.dumps(state))
    with pytest.raises(LensError, match="made with positions_per_sequence=1, not 2"):
        dump_activations(config_from_dict({**base, "positions_per_sequence": 2}))
    dump_activations(cfg)
    lone = config_from_dict(_base(tmp_path / "lone", tiny_llama_dir, corpus_dir))
    dump_activations(lone)
    for split in ("train", "val"):
        assert _contents(split_of(cfg, split)) == _contents(split_of(lone, split))


def test_resume_after_a_corpus_edit_is_refused(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch, capsys
):
    corpus = tmp_path / "corpus_copy"
    corpus.mkdir()
    for doc in sorted(corpus_dir.iterdir()):
        (corpus / doc.name).write_text(doc.read_text())
    base = _base(tmp_path, tiny_llama_dir, corpus)
    root = _interrupted_dump(monkeypatch, base)
    before = _snapshot(root)
    # The edit reorders the windows: without the corpus key the rerun would mix both corpora.
    (corpus / "doc_00.txt").write_text("the war " * 200)
    line = cli_error(capsys, _argv(base), sole_error_line=True)
    assert "made with corpus_key=" in line and "delete that directory" in line
    assert _snapshot(root) == before


def test_interrupted_and_resumed_dump_has_disjoint_splits_equal_to_a_lone_run(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch, capsys
):
    """The proof of disjointness after a resume: a refused rerun, then the matching one."""
    base = _base(tmp_path / "resumed", tiny_llama_dir, corpus_dir)
    _interrupted_dump(monkeypatch, base)
    cli_error(capsys, _argv({**base, "val_samples": 4}), sole_error_line=True)  # refused, as above
    dump_activations(config_from_dict(base))
    lone = _base(tmp_path / "lone", tiny_llama_dir, corpus_dir)
    dump_activations(config_from_dict(lone))
    cfg, lone_cfg = config_from_dict(base), config_from_dict(lone)
    train, val = split_of(cfg, "train"), split_of(cfg, "val")
    train_idx, val_idx = _seq_index(train), _seq_index(val)
    assert len(train_idx) == 24 and len(set(train_idx)) == 24
    assert len(val_idx) == 8 and len(set(val_idx)) == 8
    assert not set(train_idx) & set(val_idx)
    assert not _contexts(train) & _contexts(val)
    for split in ("train", "val"):
        assert _contents(split_of(cfg, split)) == _contents(split_of(lone_cfg, split))


def test_refused_val_split_leaves_the_train_split_untouched(tmp_path, tiny_llama_dir, corpus_dir):
    base = _base(tmp_path, tiny_llama_dir, corpus_dir)
    cfg = config_from_dict(base)
    dump_activations(cfg)
    (split_of(cfg, "val") / "progress.json").write_text('{"header": 1, "shards": []}')
    before = _snapshot(Path(base["output_dir"]))
    with pytest.raises(LensError, match="progress.json' is damaged") as err:
        dump_activations(cfg)
    assert "\n" not in str(err.value)
    assert _snapshot(Path(base["output_dir"])) == before


def test_a_val_split_left_from_another_config_is_refused(tmp_path, tiny_llama_dir, corpus_dir):
    base = _base(tmp_path, tiny_llama_dir, corpus_dir)
    dump_activations(config_from_dict(base))
    # Its train split is caught by its header (val_samples=8); without it, the val split is left.
    shutil.rmtree(split_of(config_from_dict(base), "train"))
    before = _snapshot(Path(base["output_dir"]))
    with pytest.raises(LensError, match="holds a val split of an earlier dump"):
        dump_activations(config_from_dict({**base, "val_samples": 0}))
    assert _snapshot(Path(base["output_dir"])) == before
    assert not split_of(config_from_dict(base), "train").exists()


def test_plans_of_every_val_size_are_disjoint(tmp_path, tiny_llama_dir, corpus_dir):
    from consistency_lens.data.corpus import tokenized_corpus
    from consistency_lens.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    corpus = tokenized_corpus(str(corpus_dir), tokenizer, tmp_path / "cache")
    for val in (0, 1, 7, 20):
        cfg = config_from_dict(_base(tmp_path, tiny_llama_dir, corpus_dir, val_samples=val))
        plans, _ = dump_mod.plan_splits(cfg, corpus, None)
        train, held = plans["train"].seq_index, plans["val"].seq_index
        assert len(held) == val and len(train) == 24
        assert np.intersect1d(train, held).size == 0


def test_concurrent_dump_exits_2_and_the_first_equals_a_lone_run(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch, capsys
):
    base = _base(tmp_path / "shared", tiny_llama_dir, corpus_dir)
    real, first_shard, go_on = dump_mod._write_shard, threading.Event(), threading.Event()

    def paused(path, tensors):
        digest = real(path, tensors)
        first_shard.set()
        assert go_on.wait(120)
        return digest

    monkeypatch.setattr(dump_mod, "_write_shard", paused)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            dump_activations(config_from_dict(base))
        except BaseException as err:  # surfaced below
            errors.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert first_shard.wait(120)
        root = Path(base["output_dir"])
        before = _snapshot(root, locks=True)
        line = cli_error(capsys, _argv(base), sole_error_line=True)
        train = split_of(config_from_dict(base), "train")
        assert f"'{train}' is in use by another consistency-lens process (PID {os.getpid()})" in (
            line
        )
        assert _snapshot(root, locks=True) == before
    finally:
        go_on.set()
        thread.join(120)
    assert not errors
    monkeypatch.setattr(dump_mod, "_write_shard", real)
    lone = _base(tmp_path / "lone", tiny_llama_dir, corpus_dir)
    dump_activations(config_from_dict(lone))
    for split in ("train", "val"):
        a, b = split_of(config_from_dict(base), split), split_of(config_from_dict(lone), split)
        assert _contents(a) == _contents(b)


def test_lock_of_a_killed_owner_is_stale(tmp_path, tiny_llama_dir, corpus_dir, capsys):
    base = _base(tmp_path, tiny_llama_dir, corpus_dir)
    train = split_of(config_from_dict(base), "train")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from consistency_lens.utils.lock import dir_lock\n"
            f"with dir_lock({str(train)!r}, 'dump split', 'wait'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        line = cli_error(capsys, _argv(base), sole_error_line=True)
        assert f"(PID {holder.pid})" in line and "use another output_dir" in line
        assert not (train / "progress.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (train / ".lock").read_text().strip() == str(holder.pid)  # left behind, but stale
    dump_activations(config_from_dict(base))
    assert len(_seq_index(train)) == 24


def _train_cfg(base: dict, run_dir: Path):
    return config_from_dict({**base, "train": {"run_dir": str(run_dir), "t_text": 2, "steps": 1}})


def test_train_refuses_splits_of_two_dumps(tmp_path, tiny_llama_dir, corpus_dir):
    from consistency_lens.training import trainer

    base = _base(tmp_path / "a", tiny_llama_dir, corpus_dir)
    other = _base(tmp_path / "b", tiny_llama_dir, corpus_dir, val_samples=4)
    dump_activations(config_from_dict(base))
    dump_activations(config_from_dict(other))
    val = split_of(config_from_dict(base), "val")
    shutil.rmtree(val)
    shutil.copytree(split_of(config_from_dict(other), "val"), val)
    with pytest.raises(LensError, match=r"come from different dumps \(val_samples=8 vs 4\)"):
        trainer.train(_train_cfg(base, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_refuses_a_val_split_sharing_sequences_with_train(
    tmp_path, tiny_llama_dir, corpus_dir
):
    import json

    from safetensors.torch import save_file

    from consistency_lens.training import trainer
    from consistency_lens.utils.io import sha256_file

    base = _base(tmp_path, tiny_llama_dir, corpus_dir)
    dump_activations(config_from_dict(base))
    train, val = (
        split_of(config_from_dict(base), "train"),
        split_of(config_from_dict(base), "val"),
    )
    leaked = _seq_index(train)[:3]
    shard = val / "shard_00000.safetensors"
    tensors = load_file(shard)
    tensors["seq_index"][:3] = torch.tensor(leaked)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    for name in ("metadata.json", "progress.json"):  # checksums fixed: only the overlap is wrong
        meta = json.loads((val / name).read_text())
        meta["shards"][0]["sha256"] = sha256_file(shard)
        (val / name).write_text(json.dumps(meta))
    with pytest.raises(LensError, match="share 3 corpus sequences"):
        trainer.train(_train_cfg(base, tmp_path / "run"))
