"""`consistency-lens eval` and `consistency-lens card`.

Eval never writes into the lens directory: results go to the run directory or `--output DIR`;
`consistency-lens card LENS --results FILE` is the one command that puts them in a lens's card."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from consistency_lens.config import LensConfig, dump_settings
from consistency_lens.data.dump import may_train_on_val
from consistency_lens.errors import LensError
from consistency_lens.evaluation.card import model_card, verdict_line
from consistency_lens.evaluation.faithfulness import evaluate
from consistency_lens.evaluation.samples import (
    log_samples_wandb,
    qualitative_samples,
    write_samples,
)
from consistency_lens.evaluation.saved_lens import load_lens, refuse_lens_dir
from consistency_lens.evaluation.splits import lens_mean, open_split
from consistency_lens.evaluation.tables import print_rich
from consistency_lens.models.ceiling import load_ceiling
from consistency_lens.models.lens import CONFIG_FILE, MEAN_FILE
from consistency_lens.utils.io import atomic_write_json, atomic_write_text, read_json, sha256_file

if TYPE_CHECKING:
    from consistency_lens.models.lens import ConsistencyLens


def default_output(cfg: LensConfig, lens: ConsistencyLens) -> Path:
    """`train.run_dir`, or `<run_dir>/eval_<corpus>` when evaluating on another corpus than the
    lens's own, so a check on other text never replaces the run's own results."""
    from consistency_lens.data.corpus import corpus_slug

    run_dir = Path(cfg.train.run_dir)
    if cfg.corpus == lens.cfg.corpus and cfg.corpus_split == lens.cfg.corpus_split:
        return run_dir
    return run_dir / f"eval_{corpus_slug(cfg.corpus)}"


def evaluate_command(cfg: LensConfig, checkpoint: Path | None, output: Path | None = None) -> dict:
    """Evaluate a saved lens; write eval_results.json and samples to `output` (default: the run
    directory), print tables. Nothing in the lens directory is written."""
    lens, path = load_lens(cfg, checkpoint)
    out_dir = Path(output) if output is not None else default_output(cfg, lens)
    refuse_lens_dir(out_dir, path, "Eval output")
    dataset = open_split(cfg, lens, "val", seed=cfg.seed, dump_missing=True)
    # Said before the numbers, since a lens read on samples it trained on looks better than it
    # is; checked against the config that dumped the split read, whatever `cfg` says.
    leak = may_train_on_val(lens.cfg, dump_settings(dataset.metadata["config"]))
    if leak:
        print(f"Warning: the lens may have trained on some of these val samples: {leak}.")
    mean, mean_set = lens_mean(cfg, lens)
    ceiling = load_ceiling(lens, path)
    results = evaluate(lens, dataset, cfg, mean, ceiling and ceiling[0])
    if ceiling is not None:
        row = results["baselines"]["context_ceiling"]
        row["trained"] = ceiling[1].get("trained")
        # Which reader the ceiling is (its weights; `evaluate` records the order it read the
        # lens's text in): `compare` pairs its readings of two texts only for the same reader.
        row["weights_sha256"] = ceiling[1].get("weights_sha256")
    results["checkpoint"] = str(path)
    results["corpus"] = cfg.corpus
    # Where the mean-ablation vector came from: the lens's own file, or a train split read here.
    results["mean_from"] = str(path / MEAN_FILE if mean_set is None else mean_set)
    results["lens_weights_sha256"] = read_json(path / CONFIG_FILE, "Lens config").get(
        "weights_sha256"
    )
    results["val_leak"] = leak
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "eval_results.json", results)
    records = qualitative_samples(lens, dataset, cfg)
    jsonl, html_path = write_samples(records, out_dir, results.get("specificity"))
    if cfg.wandb.enabled and records:
        log_samples_wandb(records, cfg)
    print_rich(results)
    print(verdict_line(results).replace("**", ""))
    print(f"results: {out_dir / 'eval_results.json'}\nsamples: {html_path} ({jsonl.name})")
    return results


def card_command(lens_dir: Path, results_file: Path) -> Path:
    """Write the model card (and eval_results.json) of a saved lens from an eval results file."""
    from consistency_lens.models.lens import CARD_FILE, WEIGHTS_FILE, card_text

    lens_dir, results_file = Path(lens_dir), Path(results_file)
    meta = read_json(lens_dir / CONFIG_FILE, "Lens config")
    results = read_json(results_file, "Eval results")
    weights = lens_dir / WEIGHTS_FILE
    recorded = results.get("lens_weights_sha256")
    if recorded is None or not weights.is_file() or recorded != sha256_file(weights):
        raise LensError(
            f"Results '{results_file}' were not computed on the weights of the lens at "
            f"'{lens_dir}'; run `consistency-lens eval --checkpoint {lens_dir}` and pass its "
            "eval_results.json."
        )
    atomic_write_json(lens_dir / "eval_results.json", results)
    atomic_write_text(lens_dir / CARD_FILE, card_text(meta, model_card(results), results))
    return lens_dir / CARD_FILE
