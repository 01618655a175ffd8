"""Lenses on the Hub, offline: a repo id resolves from a cache laid out as `huggingface_hub` lays
it out, the card parses with its card class, and `push` uploads exactly the lens folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects

from consistency_lens.cli import main
from consistency_lens.config import LensConfig
from consistency_lens.errors import LensError
from consistency_lens.evaluation.commands import card_command
from consistency_lens.evaluation.saved_lens import load_lens
from consistency_lens.models import hub
from consistency_lens.models.lens import ConsistencyLens, card_text
from consistency_lens.utils.io import sha256_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHIPPED = Path(__file__).parents[2] / "consistency_lens" / "shipped" / "smollm2-135m-sotu-pydoc-L20"


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory) -> tuple[ConsistencyLens, Path]:
    """A tiny lens with nudged weights and a training mean, saved to a folder."""
    cfg = LensConfig(
        model=str(tiny_llama_dir), device="cpu", model_dtype="float32", layer=1, train={"t_text": 2}
    )
    lens = ConsistencyLens.build(cfg)
    with torch.no_grad():
        for param in lens.trainable_parameters().values():
            param.add_(0.01)
    lens.train_mean = torch.linspace(-1.0, 1.0, lens.d_model)
    path = tmp_path_factory.mktemp("saved") / "lens"
    lens.save_pretrained(path)
    return lens, path


def _offline_cache(monkeypatch, root: Path, repo_id: str, lens_dir: Path, *extra: str) -> Path:
    """A Hub cache holding `lens_dir` (and `extra` files) as `repo_id` at `main`, offline."""
    repo = root / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in lens_dir.iterdir():
        shutil.copy(file, snapshot / file.name)
    for name in extra:
        (snapshot / name).write_text("import os  # a lens repo may carry anything\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_a_repo_id_loads_offline_from_the_hub_cache(saved, tmp_path, monkeypatch):
    lens, path = saved
    snapshot = _offline_cache(monkeypatch, tmp_path / "hub", "org/tiny-lens", path)
    (info,) = scan_cache_dir(tmp_path / "hub").repos
    assert (info.repo_id, [r.commit_hash for r in info.revisions]) == ("org/tiny-lens", [COMMIT])
    assert hub.resolve_lens("org/tiny-lens") == snapshot
    again = ConsistencyLens.from_pretrained("org/tiny-lens", device="cpu")
    mine, theirs = lens.trainable_state_dict(), again.trainable_state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(again.train_mean, lens.train_mean)  # the training mean comes along
    # eval/explain's --checkpoint takes the repo id too.
    _, where = load_lens(lens.cfg, Path("org/tiny-lens"))
    assert where == snapshot


def test_a_repo_id_missing_offline_is_one_sentence(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    _offline_cache(monkeypatch, tmp_path / "hub", "org/other", tmp_path / "empty")
    with pytest.raises(LensError) as err:
        ConsistencyLens.from_pretrained("org/absent", device="cpu")
    assert str(err.value) == (
        "Lens 'org/absent' is neither a local folder nor in the Hub cache, and the Hub cannot be "
        "reached (offline); download it once online or pass a local lens folder."
    )


def test_a_lens_from_the_hub_obeys_the_folder_rules(saved, tmp_path, monkeypatch):
    """Only lens files are fetched; a lens asking for remote code is refused unless the caller
    allows it, as for a folder."""
    _, path = saved
    lens_dir = tmp_path / "edited"
    shutil.copytree(path, lens_dir)
    meta = json.loads((lens_dir / "lens_config.json").read_text())
    meta["config"]["trust_remote_code"] = True
    (lens_dir / "lens_config.json").write_text(json.dumps(meta))
    _offline_cache(monkeypatch, tmp_path / "hub", "org/evil", lens_dir)
    with pytest.raises(LensError, match="with trust_remote_code=true, which runs"):
        ConsistencyLens.from_pretrained("org/evil", device="cpu")
    asked = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        asked.append(kwargs["allow_patterns"])
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    hub.resolve_lens("org/evil")
    assert asked == [
        [
            "lens_config.json",
            "lens.safetensors",
            "train_mean.safetensors",
            "README.md",
            "eval_results.json",
            "context_ceiling/ceiling_config.json",
            "context_ceiling/encoder.safetensors",
        ]
    ]


def test_the_card_carries_the_hub_metadata(saved):
    meta = json.loads((SHIPPED / "lens_config.json").read_text())
    results = json.loads((SHIPPED / "eval_results.json").read_text())
    assert results["corpus"] == "sotu"  # evaluated on sotu, trained on the sotu+pydoc mixture
    results["corpus"] = "org/sotu"
    hub_meta = {**meta, "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    hub_meta["config"] = {**meta["config"], "corpus": "org/train"}
    card = ModelCard(card_text(hub_meta, "## Evaluation", results))
    data = card.data
    assert data.library_name == "consistency-lens"
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.datasets == ["org/train"]  # trained on; the eval results name org/sotu
    assert data.tags == ["consistency-lens", "interpretability", "layer-20"]
    assert data.model_name == "consistency-lens-SmolLM2-135M-Instruct-L20"
    got = {
        (r.metric_type, r.dataset_name, r.dataset_split): r.metric_value for r in data.eval_results
    }
    assert got == {
        ("kl", "org/sotu", "val"): results["kl"]["mean"],
        ("fve", "org/sotu", "val"): results["fve"]["mean"],
        ("cosine", "org/sotu", "val"): results["cosine"]["mean"],
        ("kl_recovered", "org/sotu", "val"): results["baselines"]["shuffled"]["kl_recovered"],
    }
    assert card.text.startswith("\n# Consistency lens\n") and card.text.endswith("## Evaluation\n")
    # A local base model and an embedded corpus name nothing on the Hub: left out.
    local = ModelCard((saved[1] / "README.md").read_text()).data
    assert local.base_model is None and local.datasets is None and local.eval_results is None
    assert local.library_name == "consistency-lens" and local.tags[-1] == "layer-1"
    # The embedded default's alias is named by the Hub model its GGUF was quantized from.
    shipped = ModelCard(card_text(meta)).data
    assert meta["base_model"] == "smollm2-135m"
    assert shipped.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_card_command_writes_eval_results_into_the_front_matter(saved, tmp_path):
    _, path = saved
    lens_dir = tmp_path / "lens"
    shutil.copytree(path, lens_dir)
    results = json.loads((SHIPPED / "eval_results.json").read_text())
    results["lens_weights_sha256"] = sha256_file(lens_dir / "lens.safetensors")
    (tmp_path / "results.json").write_text(json.dumps(results))
    card = ModelCard.load(card_command(lens_dir, tmp_path / "results.json"))
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {
        "kl": results["kl"]["mean"],
        "fve": results["fve"]["mean"],
        "cosine": results["cosine"]["mean"],
        "kl_recovered": results["baselines"]["shuffled"]["kl_recovered"],
    }
    assert "## Evaluation" in card.text


def test_push_uploads_exactly_the_lens_files(saved, tmp_path, monkeypatch, capsys):
    _, path = saved
    lens_dir = tmp_path / "lens"
    shutil.copytree(path, lens_dir)
    (lens_dir / "eval_results.json").write_text("{}")
    (lens_dir / "notes.txt").write_text("not part of the lens")
    (lens_dir / "model.bin").write_bytes(b"pickle")
    (lens_dir / ".cache").mkdir()
    (lens_dir / "context_ceiling").mkdir()
    for name in ("ceiling_config.json", "encoder.safetensors", "optimizer.pt"):
        (lens_dir / "context_ceiling" / name).write_text("{}")
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id))

    def upload_folder(self, *, folder_path, repo_id, allow_patterns, **kwargs):
        files = sorted(
            str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()
        )
        # huggingface_hub's own filter, as `upload_folder` applies it.
        calls.append((repo_id, list(filter_repo_objects(files, allow_patterns=allow_patterns))))
        return "https://huggingface.co/org/tiny-lens/commit/abc"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    main(["push", str(lens_dir), "org/tiny-lens"])
    assert calls == [
        "org/tiny-lens",
        (
            "org/tiny-lens",
            [
                "README.md",
                "context_ceiling/ceiling_config.json",
                "context_ceiling/encoder.safetensors",
                "eval_results.json",
                "lens.safetensors",
                "lens_config.json",
                "train_mean.safetensors",
            ],
        ),
    ]
    assert capsys.readouterr().out == "pushed: https://huggingface.co/org/tiny-lens/commit/abc\n"


def test_push_refuses_an_incomplete_lens_or_a_bad_repo_id(saved, tmp_path, capsys):
    _, path = saved
    lens_dir = tmp_path / "lens"
    shutil.copytree(path, lens_dir)
    (lens_dir / "lens.safetensors").write_bytes(b"changed")
    for argv, message in (
        ([str(lens_dir), "org/x"], f"Lens weights '{lens_dir / 'lens.safetensors'}' are corrupt"),
        ([str(tmp_path), "org/x"], f"No saved lens at '{tmp_path}' (lens_config.json missing)"),
        ([str(path), "no-slash"], "'no-slash' is not a Hub repo id; pass it as org/name."),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["push", *argv])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")
