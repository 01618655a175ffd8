"""The bad-input matrix: each bad input gets one clear sentence (exit 2) and leaves no partial output.

Already covered elsewhere with the same assertion, so not repeated here: a bit-flipped or truncated
checkpoint falls back to the previous one (tests/utils/test_checkpoint.py, tests/training/
test_trainer.py); a corrupt dump shard is named by its checksum (tests/data/test_dump.py); a
partly-NaN dump is skipped and counted (tests/training/test_trainer.py); a lens loaded with another
model, layer or width is refused (tests/models/test_lens.py).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import split_of, tiny_dump_config, tiny_train_config
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import consistency_lens.data.dump as dump_mod
from consistency_lens.cli import main
from consistency_lens.config import config_from_dict
from consistency_lens.data.dump import dump_activations
from consistency_lens.errors import LensError
from consistency_lens.training import checkpoint as ck
from consistency_lens.training import trainer
from consistency_lens.utils import io
from consistency_lens.utils.io import sha256_file


def _base(root: Path, model: Path, corpus: Path) -> dict:
    return tiny_dump_config(
        root,
        model,
        corpus,
        seq_len=24,
        p_min=3,
        num_samples=16,
        shard_size=8,
        train=tiny_train_config(root / "run"),
        eval={"num_samples": 8, "batch_size": 8, "bootstrap": 0, "qualitative": 1},
    )


def _argv(base: dict, **over: object) -> list[str]:
    """`key=value` overrides for the CLI from a nested config dict."""
    flat = {}
    for key, value in base.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    flat.update(over)
    return [f"{k}={v}" for k, v in flat.items()]


def _one_sentence(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with a single `error:` line, last, and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Model-loading and training progress lines may come first; the error is one line, last.
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir, tiny_gpt2_dir, corpus_dir) -> dict:
    """A llama dump + a 1-step lens at layer 1, and a gpt2 dump (same width, other model)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    base = _base(root, tiny_llama_dir, corpus_dir)
    cfg = config_from_dict(base)
    dump_activations(cfg)
    trainer.train(cfg)
    other = {**base, "model": str(tiny_gpt2_dir), "output_dir": str(root / "acts_gpt2")}
    dump_activations(config_from_dict(other))
    return {"root": root, "base": base, "cfg": cfg, "gpt2": config_from_dict(other)}


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("num_sample=3", "did you mean 'num_samples'?"),
        ("train.t_txt=3", "did you mean 'train.t_text'?"),
        ("layer=abc", "Config key 'layer'"),
        ("train.steps=[1, 2]", "Config key 'train.steps'"),
        ("train.t_text=0", "Config key 'train.t_text'"),
        ("train.mode=half", "Config key 'train.mode'"),
    ],
)
def test_config_errors_name_the_key(capsys, tmp_path, monkeypatch, override, expected):
    monkeypatch.chdir(tmp_path)
    line = _one_sentence(capsys, ["dump", override])
    assert expected in line
    assert _files(tmp_path) == set()


def test_invalid_yaml_is_one_line_with_its_position(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("layer: 1\ntrain:\n  steps: [1,\n")
    line = _one_sentence(capsys, ["train", "--config", str(bad)])
    assert "bad.yaml' is not valid YAML at line" in line
    assert _files(tmp_path) == {bad}


# --- dump ----------------------------------------------------------------------------------


def _dump_error(capsys, world: dict, tmp_path: Path, **over: object) -> str:
    base = {**world["base"], "output_dir": tmp_path / "acts", "cache_dir": tmp_path / "cache"}
    line = _one_sentence(capsys, ["dump", *_argv(base, **over)])
    assert not (tmp_path / "acts").exists()
    # A corpus cache is either complete or absent; never a half-built directory.
    for entry in (tmp_path / "cache").glob("*"):
        assert (entry / "meta.json").is_file(), entry
    return line


def test_layer_out_of_range(capsys, world, tmp_path):
    line = _dump_error(capsys, world, tmp_path, layer=9)
    assert "layer=9 is out of range: this model has 4 blocks" in line


def test_seq_len_beyond_the_model_context(capsys, world, tmp_path):
    line = _dump_error(capsys, world, tmp_path, seq_len=4000)
    assert "seq_len=4000 is longer than model" in line and "seq_len <= 256" in line


def test_positions_impossible_for_short_texts(capsys, world, tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    for i in range(4):
        (short / f"{i}.txt").write_text("the nation")
    line = _dump_error(capsys, world, tmp_path, corpus=short, p_min=20, seq_len=64)
    assert "no text long enough for positions 20..seq_len-2" in line


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.txt": b"   \n\n"}, "is empty"),
        ({"a.bin": bytes(range(256))}, "holds no .txt or .jsonl files"),
        ({"a.txt": b"\xff\xfe\x00binary\x80"}, "is not UTF-8 text"),
        ({"a.jsonl": b'{"body": "x"}\n'}, "has no 'text' field"),
        ({"a.jsonl": b'{"text": "ok"}\n{"text": "\xff\xfe"}\n'}, "is not UTF-8 text"),
    ],
)
def test_empty_or_non_text_corpus(capsys, world, tmp_path, files, expected):
    corpus = tmp_path / "corpus_in"
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    line = _dump_error(capsys, world, tmp_path, corpus=corpus)
    assert expected in line
    assert not list((tmp_path / "cache").glob("*"))


def test_fixed_empty_corpus_is_read_again(capsys, world, tmp_path):
    corpus = tmp_path / "corpus_in"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ")
    _dump_error(capsys, world, tmp_path, corpus=corpus)
    shutil.copytree(world["base"]["corpus"], corpus, dirs_exist_ok=True)
    base = {**world["base"], "output_dir": tmp_path / "acts", "cache_dir": tmp_path / "cache"}
    main(["dump", *_argv(base, corpus=corpus)])
    assert (tmp_path / "acts").is_dir()


def test_missing_model_path(capsys, world, tmp_path):
    line = _dump_error(capsys, world, tmp_path, model=tmp_path / "no_such_model")
    assert "no_such_model' does not exist" in line


def test_no_space_while_writing_a_shard(capsys, world, tmp_path, monkeypatch):
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # what a full disk leaves behind
        raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")

    monkeypatch.setattr(dump_mod, "save_file", full)
    base = {**world["base"], "output_dir": tmp_path / "acts", "cache_dir": tmp_path / "cache"}
    line = _one_sentence(capsys, ["dump", *_argv(base)])
    assert "No space left on the device while writing" in line and "shard_00000" in line
    # The split directory exists, but neither the torn shard nor its temporary file is left;
    # only its lock file, released (empty).
    train = split_of(config_from_dict(base), "train")
    assert [p.name for p in train.iterdir()] == [".lock"] and (train / ".lock").read_bytes() == b""


def test_no_space_in_atomic_write_leaves_no_file(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "replace", full)
    with pytest.raises(LensError, match="No space left on the device while writing") as err:
        io.atomic_write_json(tmp_path / "out.json", {"a": 1})
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --- train ---------------------------------------------------------------------------------


def _train_error(capsys, world: dict, tmp_path: Path, **over) -> str:
    run_dir = tmp_path / "run"
    argv = ["train", *_argv(world["base"], **{"train.run_dir": run_dir, **over})]
    line = _one_sentence(capsys, argv)
    assert not (run_dir / "lens").exists()
    assert not list(run_dir.glob("checkpoints/step_*"))
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob(".tmp-*"))
    return line


def _copy_split_dirs(src_cfg, dst_cfg) -> None:
    for split in ("train", "val"):
        shutil.copytree(split_of(src_cfg, split), split_of(dst_cfg, split))


def test_train_on_a_dump_of_another_model(capsys, world, tmp_path):
    target = {**world["base"], "output_dir": str(tmp_path / "acts")}
    _copy_split_dirs(world["gpt2"], config_from_dict(target))
    line = _train_error(capsys, world, tmp_path, output_dir=tmp_path / "acts")
    assert "was made with model" in line and "dump again" in line


def test_train_on_a_dump_of_another_layer(capsys, world, tmp_path):
    target = {**world["base"], "output_dir": str(tmp_path / "acts"), "layer": 2}
    _copy_split_dirs(world["cfg"], config_from_dict(target))
    line = _train_error(capsys, world, tmp_path, output_dir=tmp_path / "acts", layer=2)
    assert "was made at layer 1 but the config says layer=2" in line


def _rewrite_shard(path: Path, change) -> None:
    """Change a shard's tensors and fix every checksum, so only the content check can object."""
    tensors = load_file(str(path))
    save_file(change(tensors), str(path), metadata={"format": "pt"})
    digest = sha256_file(path)
    for name in ("metadata.json", "progress.json"):
        meta_path = path.parent / name
        meta = json.loads(meta_path.read_text())
        for shard in meta["shards"]:
            if shard["file"] == path.name:
                shard["sha256"] = digest
        meta_path.write_text(json.dumps(meta))


def test_nan_and_inf_activations_stop_training(capsys, world, tmp_path):
    acts = tmp_path / "acts"
    target = config_from_dict({**world["base"], "output_dir": str(acts)})
    _copy_split_dirs(world["cfg"], target)

    def poison(tensors: dict) -> dict:
        a = tensors["A"].clone()
        a[0::2, 0] = float("nan")
        a[1::2, 3] = float("inf")
        return {**tensors, "A": a}

    for shard in split_of(target, "train").glob("shard_*.safetensors"):
        _rewrite_shard(shard, poison)
    line = _train_error(
        capsys,
        world,
        tmp_path,
        output_dir=acts,
        **{"train.max_bad_batches": 2},
    )
    assert "Training stopped at step 1: 2 consecutive batches were skipped" in line
    assert "NaN/inf in the activations" in line


def test_resume_from_an_incompatible_checkpoint_version(capsys, world, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(
        Path(world["base"]["train"]["run_dir"]) / "checkpoints", run_dir / "checkpoints"
    )
    path = ck.latest_valid(run_dir)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["format_version"] = 99
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    before = _files(run_dir)
    line = _one_sentence(
        capsys, ["train", *_argv(world["base"], **{"train.run_dir": run_dir}), "--resume"]
    )
    assert "format version 99" in line and "start a new train.run_dir" in line
    # Only the run's lock file, taken (and released, empty) before the checkpoint was read.
    assert _files(run_dir) == before | {run_dir / ".lock"}
    assert (run_dir / ".lock").read_bytes() == b""


def test_no_space_while_checkpointing(capsys, world, tmp_path, monkeypatch):
    real = torch.save

    def full(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from None

    monkeypatch.setattr(torch, "save", full)
    line = _train_error(capsys, world, tmp_path)
    monkeypatch.setattr(torch, "save", real)
    assert "No space left on the device while writing" in line and "step_1" in line
    assert "rerun with --resume" in line
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


# --- eval and explain ------------------------------------------------------------------------


def _lens_copy(world: dict, tmp_path: Path) -> Path:
    lens = tmp_path / "lens"
    shutil.copytree(Path(world["base"]["train"]["run_dir"]) / "lens", lens)
    return lens


@pytest.mark.parametrize("command", ["eval", "explain"])
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / "lens.safetensors").write_bytes(b"\x00" * 7), "are corrupt"),
        (lambda d: (d / "lens.safetensors").unlink(), "do not exist"),
        (lambda d: (d / "lens_config.json").write_text("{half"), "is corrupt (not valid JSON)"),
        (lambda d: (d / "lens_config.json").unlink(), "No saved lens"),
    ],
)
def test_corrupt_lens_directory(capsys, world, tmp_path, command, damage, expected):
    lens = _lens_copy(world, tmp_path)
    damage(lens)
    run_dir = tmp_path / "run"
    extra = ["--text", "the nation", "--html", str(tmp_path / "x.html")]
    argv = [command, *_argv(world["base"], **{"train.run_dir": run_dir}), "--checkpoint", str(lens)]
    line = _one_sentence(capsys, argv + (extra if command == "explain" else []))
    assert expected in line
    assert not run_dir.exists() and not (tmp_path / "x.html").exists()


def test_eval_on_a_dump_of_another_model(capsys, world, tmp_path):
    acts = tmp_path / "acts"
    _copy_split_dirs(world["gpt2"], config_from_dict({**world["base"], "output_dir": str(acts)}))
    lens = _lens_copy(world, tmp_path)
    before = _files(lens)
    run_dir = tmp_path / "run"
    argv = ["eval", *_argv(world["base"], output_dir=acts, **{"train.run_dir": run_dir})]
    line = _one_sentence(capsys, [*argv, "--checkpoint", str(lens)])
    assert "does not match the lens" in line and "dump with the lens's model" in line
    assert not run_dir.exists() and _files(lens) == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "is empty"), ("the nation " * 200, "the model reads at most 256")],
)
def test_explain_text_too_short_or_too_long(capsys, world, tmp_path, text, expected):
    html = tmp_path / "out.html"
    argv = ["explain", *_argv(world["base"]), "--text", text, "--html", str(html)]
    assert expected in _one_sentence(capsys, argv)
    assert not html.exists()


def test_explain_file_that_does_not_exist(capsys, world, tmp_path):
    argv = ["explain", *_argv(world["base"]), "--file", str(tmp_path / "missing.txt")]
    assert "missing.txt' does not exist" in _one_sentence(capsys, argv)


# --- more bad inputs --------------------------------------------------------------------------


def _broken_model(src: Path, out: Path, kind: str) -> Path:
    if kind == "empty":
        out.mkdir()
        return out
    shutil.copytree(src, out)
    if kind == "truncated":
        weights = out / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "no_tokenizer":
        for path in out.iterdir():
            if "token" in path.name or path.name.startswith("special"):
                path.unlink()
    elif kind == "pickle_only":
        torch.save(load_file(str(out / "model.safetensors")), out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    return out


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("empty", "Should have a `model_type` key"),
        ("truncated", "Error while deserializing header"),
        ("no_tokenizer", "Could not load the tokenizer of model"),
        ("pickle_only", "holds only pickle weights (.bin/.pt), which are not loaded"),
    ],
)
def test_broken_model_folder(capsys, world, tmp_path, tiny_llama_dir, kind, expected):
    model = _broken_model(tiny_llama_dir, tmp_path / "model", kind)
    line = _dump_error(capsys, world, tmp_path, model=model)
    assert expected in line and str(model) in line


def test_config_file_not_utf8(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"layer: 1\ncorpus: \xff\xfe\n")
    line = _one_sentence(capsys, ["train", "--config", str(bad)])
    assert line == f"error: Config file '{bad}' is not UTF-8 text; save it as UTF-8."
    assert _files(tmp_path) == {bad}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=-1", "Config key 'seed': Input should be greater than or equal to 0"),
        ("seed=2147483648", "Config key 'seed': Input should be less than 2147483648"),
        ("train.grad_clip=-1", "Config key 'train.grad_clip': Input should be greater than 0"),
        ("train.ema_decay=1.5", "Config key 'train.ema_decay': Input should be less than 1"),
        ("train.ema_decay=0", "Config key 'train.ema_decay': Input should be greater than 0"),
        ("train.alpha.start=-1", "Config key 'train.alpha'"),
        ("train.alpha.end=-0.5", "Config key 'train.alpha'"),
        ("train.lr_schedule.end=-1", "Config key 'train.lr_schedule'"),
        ("train.tau.start=0", "Config key 'train.tau'"),
        ("train.tau.end=-1", "Config key 'train.tau'"),
        ("train.tau={kind: exponential, start: 1, end: 0}", "exponential schedule needs"),
        ("num_samples=0", "Config key 'num_samples'"),
        ("max_norm_ratio=0.5", "Config key 'max_norm_ratio'"),
    ],
)
def test_nonsense_values_are_refused_at_config_time(
    capsys, tmp_path, monkeypatch, override, expected
):
    monkeypatch.chdir(tmp_path)
    line = _one_sentence(capsys, ["train", override])
    assert expected in line
    assert _files(tmp_path) == set()


def test_cuda_device_out_of_range(capsys, world, tmp_path, monkeypatch):
    from consistency_lens.models import loading

    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading.torch.cuda, "device_count", lambda: 1)
    line = _dump_error(capsys, world, tmp_path, device="cuda:3")
    assert "device='cuda:3' is out of range: this machine has 1 CUDA device(s)" in line


def _unusable_path(tmp_path: Path, kind: str) -> Path:
    if kind == "file":
        (tmp_path / "a_file").write_text("x")
        return tmp_path / "a_file"
    if kind == "dangling":
        (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
        return tmp_path / "dangling"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path / "loop"


@pytest.mark.parametrize("kind", ["file", "dangling", "loop"])
@pytest.mark.parametrize("key", ["output_dir", "cache_dir"])
def test_dump_paths_that_are_files_or_bad_links(capsys, world, tmp_path, kind, key):
    bad = _unusable_path(tmp_path, kind)
    base = {**world["base"], "output_dir": tmp_path / "acts", "cache_dir": tmp_path / "cache"}
    line = _one_sentence(capsys, ["dump", *_argv(base, **{key: bad})])
    assert "Cannot create the" in line and str(bad) in line
    assert not (tmp_path / "acts").exists() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("kind", ["file", "dangling", "loop"])
def test_run_dir_that_is_a_file_or_bad_link(capsys, world, tmp_path, kind):
    bad = _unusable_path(tmp_path, kind)
    line = _one_sentence(capsys, ["train", *_argv(world["base"], **{"train.run_dir": bad})])
    assert f"Cannot create the run directory '{bad}'" in line
    assert not (tmp_path / "nowhere").exists()


def test_read_only_output_and_run_dirs(capsys, world, tmp_path, monkeypatch):
    # Root ignores permission bits, so a read-only file system is simulated where it answers.
    read_only = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(read_only)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    line = _dump_error(capsys, world, tmp_path, output_dir=read_only / "acts")
    assert "Cannot create the dump split" in line and "(Read-only file system)" in line
    line = _train_error(capsys, world, tmp_path, **{"train.run_dir": read_only / "run"})
    assert f"Cannot create the run directory '{read_only / 'run'}' (Read-only file system)" in line


def test_read_only_html_target_is_one_sentence(capsys, world, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    html = tmp_path / "out.html"
    argv = ["explain", *_argv(world["base"]), "--text", "the nation", "--html", str(html)]
    line = _one_sentence(capsys, argv)
    assert f"Cannot use '{tmp_path}' (read-only file system)" in line
    assert not html.exists()


def test_html_path_that_is_a_folder(capsys, world, tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    argv = ["explain", *_argv(world["base"]), "--text", "the nation", "--html", str(folder)]
    line = _one_sentence(capsys, argv)
    assert line == (
        f"error: --html '{folder}' is a directory; pass a file path such as "
        f"'{folder / 'explain.html'}'."
    )
    assert _files(folder) == set()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m.pop("d_model"), "key 'd_model' must be a int but is missing"),
        (lambda m: m.pop("base_model"), "key 'base_model' must be a str but is missing"),
        (lambda m: m.update(layer="1"), "key 'layer' must be a int but is a str"),
        (lambda m: m.update(layer=True), "key 'layer' must be a int but is a bool"),
        (lambda m: m.update(config=[]), "key 'config' must be a dict but is a list"),
        (lambda m: m["config"].update(layer="x"), "upgrade to read it): Config key 'layer'"),
        (
            lambda m: m["config"]["decode"].update(added_later=1),
            "saved by a newer consistency-lens (upgrade to read it): Unknown config key "
            "'decode.added_later'",
        ),
    ],
)
def test_lens_config_missing_keys_or_wrong_types(capsys, world, tmp_path, edit, expected):
    lens = _lens_copy(world, tmp_path)
    meta = json.loads((lens / "lens_config.json").read_text())
    edit(meta)
    (lens / "lens_config.json").write_text(json.dumps(meta))
    before = _files(lens)
    run_dir = tmp_path / "run"
    argv = ["eval", *_argv(world["base"], **{"train.run_dir": run_dir}), "--checkpoint", str(lens)]
    line = _one_sentence(capsys, argv)
    assert expected in line and "lens_config.json" in line
    assert not run_dir.exists() and _files(lens) == before


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"train.t_text": 300}, "train.t_text=300 plus the decoder prompt ("),
        ({"train.t_text": 256}, "train.t_text=256 plus the decoder prompt ("),
        (
            {"train.t_text": 200, "train.encoder_prompt": "the nation " * 30},
            "train.t_text=200 plus the encoder prompt (",
        ),
    ],
)
def test_text_plus_prompt_beyond_the_model_context(capsys, world, tmp_path, over, expected):
    line = _train_error(capsys, world, tmp_path, **over)
    assert expected in line and "reads at most 256" in line
