"""Lenses on the Hugging Face Hub: resolve a repo id to a local lens folder, push a folder, and the
model card's metadata the Hub reads. Everything goes through `huggingface_hub`, so its cache,
offline mode (`HF_HUB_OFFLINE`) and token apply as they do for models."""

from __future__ import annotations

import re
from pathlib import Path

from consistency_lens.errors import LensError

# `org/name`: what the Hub calls a repo id (a local folder is tried first).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EVAL_RESULTS_FILE = "eval_results.json"


def lens_files() -> tuple[str, ...]:
    """The files of a lens folder, the only ones downloaded or uploaded (never code or pickles):
    the lens, its training mean, its card and eval results, and the context ceiling beside it."""
    from consistency_lens.models.ceiling import CEILING_CONFIG, CEILING_DIR, CEILING_WEIGHTS
    from consistency_lens.models.lens import CARD_FILE, CONFIG_FILE, MEAN_FILE, WEIGHTS_FILE

    ceiling = (f"{CEILING_DIR}/{CEILING_CONFIG}", f"{CEILING_DIR}/{CEILING_WEIGHTS}")
    return (CONFIG_FILE, WEIGHTS_FILE, MEAN_FILE, CARD_FILE, EVAL_RESULTS_FILE, *ceiling)


def is_repo_id(name: str | Path) -> bool:
    """Whether `name` reads as a Hub repo id `org/name` and is no existing local path."""
    return not Path(name).exists() and bool(_REPO_ID.match(str(name)))


def resolve_lens(name: str | Path, revision: str | None = None) -> Path:
    """A local lens folder for `name`: the folder itself, or a Hub repo id's snapshot of the lens
    files only, from the Hub cache (no network under `HF_HUB_OFFLINE=1`)."""
    if not is_repo_id(name):
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            str(name),
            revision=revision,
            allow_patterns=list(lens_files()),
            library_name="consistency-lens",
        )
    except LocalEntryNotFoundError:
        raise LensError(
            f"Lens '{name}' is neither a local folder nor in the Hub cache, and the Hub cannot be "
            "reached (offline); download it once online or pass a local lens folder."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
        raise LensError(
            f"Lens '{name}' is neither a local folder nor a Hub repo you can read; check the "
            "name, or log in with `hf auth login` for a private repo."
        ) from None
    return Path(folder)


def upload_list(lens_dir: Path) -> list[str]:
    """The files `push` uploads from `lens_dir`: the lens files present there."""
    return [name for name in lens_files() if (Path(lens_dir) / name).is_file()]


def push_lens(lens_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload a complete saved lens folder (its lens files only) to the Hub repo `repo_id`; the
    URL of the commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from consistency_lens.models.lens import check_lens_dir

    lens_dir = Path(lens_dir)
    if not _REPO_ID.match(repo_id):
        raise LensError(f"'{repo_id}' is not a Hub repo id; pass it as org/name.")
    check_lens_dir(lens_dir)
    api = HfApi(library_name="consistency-lens")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=lens_dir,
            repo_id=repo_id,
            allow_patterns=upload_list(lens_dir),
            commit_message="Upload consistency lens",
        )
    except HfHubHTTPError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LensError(
            f"Could not push to '{repo_id}' ({first}); log in with `hf auth login` using a token "
            "that may write there."
        ) from None
    return str(getattr(commit, "commit_url", commit))


def card_metadata(meta: dict, results: dict | None = None) -> str:
    """The model card's YAML front matter (library, base model, datasets, tags, eval results)."""
    from huggingface_hub import EvalResult, ModelCardData

    config = meta.get("config", {})
    base, corpus = meta["base_model"], config.get("corpus", "")
    # Only Hub ids: a local path means nothing on the Hub; the embedded alias is named by the
    # model its GGUF was quantized from.
    from consistency_lens.models.embedded import ALIAS, HUB_ID

    base_model = HUB_ID if base == ALIAS else base if is_repo_id(base) else None
    datasets = [corpus] if is_repo_id(corpus) else None
    name = f"consistency-lens-{Path(base.rstrip('/')).name}-L{meta['layer']}"
    evals = None
    if results is not None:
        # Named by the corpus evaluated on (results before it was recorded: the training one);
        # a local corpus by its file or folder name, not the path on the trainer's disk.
        evaluated = results.get("corpus", corpus)
        dataset = (
            evaluated if is_repo_id(evaluated) else Path(evaluated.rstrip("/")).name or "corpus"
        )
        evals = [
            EvalResult(
                task_type="activation-explanation",
                task_name="Activation explanation",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split="val",
                metric_type=metric,
                metric_name=label,
                metric_value=float(value),
            )
            for metric, label, value in _eval_metrics(results)
        ]
    data = ModelCardData(
        library_name="consistency-lens",
        base_model=base_model,
        datasets=datasets,
        tags=["consistency-lens", "interpretability", f"layer-{meta['layer']}"],
        model_name=name,
        eval_results=evals,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _eval_metrics(results: dict) -> list[tuple[str, str, float]]:
    """The headline numbers of an eval results file: (metric type, label, value)."""
    rows = [
        ("kl", "KL at P, lens", results["kl"]["mean"]),
        ("fve", "FVE of Â", results["fve"]["mean"]),
        ("cosine", "cosine of Â and A", results["cosine"]["mean"]),
    ]
    shuffled = results.get("baselines", {}).get("shuffled", {}).get("kl_recovered")
    if shuffled is not None:
        rows.append(("kl_recovered", "kl_recovered over shuffled explanations", shuffled))
    return rows
