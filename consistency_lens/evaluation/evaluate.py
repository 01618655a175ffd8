"""`consistency-lens eval`: how faithful a lens is, against zero, mean, context-token and shuffled
baselines (and the context ceiling when the lens keeps one beside it), a constant reconstruction
and a specificity check (docs/design.md section 5).

Eval never writes into the lens directory: results go to the run directory or `--output DIR`;
`consistency-lens card LENS --results FILE` is the one command that puts them in a lens's card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from consistency_lens.config import LensConfig
from consistency_lens.data.collate import CollateFn
from consistency_lens.data.layout import METADATA, check_matches, split_dir
from consistency_lens.errors import LensError
from consistency_lens.evaluation import metrics
from consistency_lens.evaluation.html import fmt
from consistency_lens.evaluation.samples import (
    log_samples_wandb,
    qualitative_samples,
    sample_indices,
    write_samples,
)
from consistency_lens.evaluation.specificity import (
    bucket_examples,
    content_words,
    specificity,
    top1_in_explanation,
)
from consistency_lens.evaluation.tables import BASELINE_NAMES as BASELINE_LABELS
from consistency_lens.evaluation.tables import ci_text, markdown_tables, print_rich
from consistency_lens.models.ceiling import load_ceiling
from consistency_lens.models.lens import CONFIG_FILE
from consistency_lens.models.patching import patched_kl
from consistency_lens.utils.io import atomic_write_json, atomic_write_text, read_json, sha256_file

BASELINES = ("zero", "mean", "context_tokens", "context_ceiling", "shuffled")


def default_checkpoint(cfg: LensConfig) -> Path:
    """The lens directory `train` writes: `<train.run_dir>/lens`."""
    return Path(cfg.train.run_dir) / "lens"


def load_lens(cfg: LensConfig, checkpoint: Path | None, shipped_fallback: bool = False):
    """Load a saved lens on `cfg.device`: `checkpoint` (a folder or Hub repo id), else
    `<train.run_dir>/lens`.

    With `shipped_fallback` (explain), a run directory that holds no lens and no checkpoints
    falls back to the lens shipped in the package for `cfg.model` (`consistency_lens.lenses`);
    eval never does, so its results are always the run's own.
    """
    from consistency_lens.lenses import shipped_lens
    from consistency_lens.models.hub import resolve_lens
    from consistency_lens.models.lens import ConsistencyLens
    from consistency_lens.training.checkpoint import checkpoints_dir

    # A Hub repo id becomes its cached snapshot of the lens files, then reads as a folder does.
    path = resolve_lens(checkpoint) if checkpoint is not None else default_checkpoint(cfg)
    # A run with checkpoints but no lens was interrupted: it must be resumed, not replaced.
    if (
        shipped_fallback
        and checkpoint is None
        and not (path / CONFIG_FILE).is_file()
        and not checkpoints_dir(cfg.train.run_dir).exists()
        and (shipped := shipped_lens(cfg.model)) is not None
    ):
        print(f"No lens at '{path}'; using the lens shipped for {cfg.model}: '{shipped}'.")
        path = shipped
    if not (path / CONFIG_FILE).is_file():
        raise LensError(
            f"No saved lens at '{path}' (lens_config.json missing); train one with "
            "`consistency-lens train` or pass --checkpoint DIR."
        )
    # The user's config names the base model and decides remote code, never the lens directory.
    lens = ConsistencyLens.from_pretrained(
        path, device=cfg.device, model=cfg.model, trust_remote_code=cfg.trust_remote_code
    )
    return lens, path


def eval_config(cfg: LensConfig, lens) -> LensConfig:
    """`cfg` with the model, layer and text length the lens was trained on (a lens directory is
    self-describing); the corpus, dump settings and output_dir stay the user's."""
    train = cfg.train.model_copy(update={"t_text": lens.cfg.train.t_text})
    return cfg.model_copy(update={"model": lens.cfg.model, "layer": lens.layer, "train": train})


def _dump_command(cfg: LensConfig) -> str:
    return (
        f"consistency-lens dump model={cfg.model} layer={cfg.layer} corpus={cfg.corpus} "
        f"output_dir={cfg.output_dir}"
    )


def open_split(cfg: LensConfig, lens, split: str, seed: int = 0, dump_missing: bool = False):
    """The dump split of `cfg.corpus` for the lens's model and layer.

    With `dump_missing`, a missing val split is dumped here (with the lens's own model), so a lens
    is checked on text of another genre in one command; otherwise a missing split is a clear error.
    """
    from consistency_lens.data.dataset import ActivationDataset
    from consistency_lens.data.dump import dump_activations

    ecfg = eval_config(cfg, lens)
    path = split_dir(ecfg, split)
    if not (path / METADATA).is_file():
        if not (dump_missing and split == "val" and ecfg.val_samples > 0):
            raise LensError(
                f"No {split} split at '{path}' for model '{lens.cfg.model}' layer {lens.layer}; "
                f"run `{_dump_command(ecfg)}` (with val_samples > 0)."
            )
        print(
            f"No val split of corpus '{ecfg.corpus}' for this lens at '{path}'; dumping "
            f"{ecfg.val_samples} validation samples with the lens's model and layer first."
        )
        dump_activations(ecfg, loaded=lens.loaded, splits=("val",))
    dataset = ActivationDataset(path, seed=seed)
    check_matches(dataset, lens)
    return dataset


def mean_split(cfg: LensConfig, lens):
    """The train split the lens was trained on (its corpus, under `cfg.output_dir` or its own)."""
    from consistency_lens.data.dataset import ActivationDataset

    own = {"corpus": lens.cfg.corpus, "corpus_split": lens.cfg.corpus_split}
    candidates = [
        split_dir(eval_config(cfg, lens).model_copy(update=own), "train"),
        split_dir(lens.cfg, "train"),
    ]
    for path in candidates:
        if (path / METADATA).is_file():
            dataset = ActivationDataset(path)
            check_matches(dataset, lens)
            return dataset
    ecfg = eval_config(cfg, lens).model_copy(update=own)
    raise LensError(
        f"No train split of the lens's training corpus '{lens.cfg.corpus}' at "
        f"'{candidates[0]}' for the mean baseline; run `{_dump_command(ecfg)}`."
    )


def train_mean(dataset) -> torch.Tensor:
    """Per-feature mean of A over a whole split, read shard by shard (the mean-ablation vector)."""
    total = torch.zeros(dataset.d_model, dtype=torch.float64)
    count = 0
    for shard in dataset.shards:
        acts = shard.handle.get_tensor("A").double()
        total += acts.sum(0)
        count += acts.shape[0]
    return (total / count).float()


def derangement(n: int, seed: int) -> list[int] | None:
    """A seeded permutation of 0..n-1 with no fixed point, uniform over derangements; None for n < 2."""
    if n < 2:
        return None
    rng = np.random.default_rng([seed, n])
    identity = np.arange(n)
    while True:
        # A uniform permutation is a derangement with probability ~1/e, so ~2.7 draws on average.
        perm = rng.permutation(n)
        if (perm != identity).all():
            return perm.tolist()


def _reconstruction(A: torch.Tensor, A_hat: torch.Tensor) -> dict:
    return {
        "mse": metrics.mse(A, A_hat),
        "nmse": metrics.normalized_mse(A, A_hat),
        "fve": metrics.fve(A, A_hat),
        "cosine": float(metrics.cosine_per_sample(A, A_hat).mean()),
    }


# Margin = how much better the lens is than the constant (positive: the lens is better).
_MARGINS = {
    "mse": lambda A, lens, const: metrics.mse(A, const) - metrics.mse(A, lens),
    "nmse": lambda A, lens, const: (
        metrics.normalized_mse(A, const) - metrics.normalized_mse(A, lens)
    ),
    "fve": lambda A, lens, const: metrics.fve(A, lens) - metrics.fve(A, const),
    "cosine": lambda A, lens, const: float(
        (metrics.cosine_per_sample(A, lens) - metrics.cosine_per_sample(A, const)).mean()
    ),
}


def constant_reference(
    A: torch.Tensor, A_hat: torch.Tensor, mean: torch.Tensor, resamples: int, seed: int
) -> dict:
    """Reconstruction metrics of the constant Â = train mean, and the lens's margin over it (CI)."""
    const = mean.float().expand_as(A)
    margins = {}
    for name, fn in _MARGINS.items():
        ci = metrics.bootstrap_ci(fn, A, A_hat, const, resamples=resamples, seed=seed)
        margins[name] = {"value": fn(A, A_hat, const), "ci": list(ci)}
    return {"constant": _reconstruction(A, const), "margin": margins}


def _kl_row(kl_lens: torch.Tensor, kl_base: torch.Tensor, boot: int, seed: int) -> dict:
    return {
        "kl": float(kl_base.mean()),
        "kl_ci": list(metrics.mean_ci(kl_base, boot, seed)),
        "kl_recovered": metrics.kl_recovered(kl_lens, kl_base),
        "kl_recovered_ci": list(metrics.kl_recovered_ci(kl_lens, kl_base, boot, seed)),
    }


UNAVAILABLE_SHUFFLED = (
    "needs at least 2 evaluated samples (a derangement of 1 sample does not exist)"
)


def _ceiling_row(
    kl_lens: torch.Tensor,
    kl_ceiling: torch.Tensor,
    A: torch.Tensor,
    A_hat: torch.Tensor,
    A_ceiling: torch.Tensor,
    boot: int,
    seed: int,
) -> dict:
    """The context ceiling's KL and FVE, the lens's kl_recovered over it and both gaps, with CIs."""

    def fve_gap(a: torch.Tensor, lens_hat: torch.Tensor, ceil_hat: torch.Tensor) -> float:
        return metrics.fve(a, lens_hat) - metrics.fve(a, ceil_hat)

    gap = kl_lens.double() - kl_ceiling.double()
    return {
        **_kl_row(kl_lens, kl_ceiling, boot, seed),
        "fve": metrics.fve(A, A_ceiling),
        "fve_ci": list(metrics.bootstrap_ci(metrics.fve, A, A_ceiling, resamples=boot, seed=seed)),
        "kl_gap": float(gap.mean()),
        "kl_gap_ci": list(metrics.mean_ci(gap, boot, seed)),
        "fve_gap": fve_gap(A, A_hat, A_ceiling),
        "fve_gap_ci": list(
            metrics.bootstrap_ci(fve_gap, A, A_hat, A_ceiling, resamples=boot, seed=seed)
        ),
    }


@torch.no_grad()
def evaluate(
    lens,
    dataset,
    cfg: LensConfig,
    mean_activation: torch.Tensor | None = None,
    ceiling: torch.nn.Module | None = None,
) -> dict:
    """KL of the lens and of each baseline, reconstruction against a constant, specificity,
    fluency and diversity, on `eval.num_samples` fixed samples of `dataset`.

    `ceiling` (the encoder `models.ceiling.load_ceiling` returns) adds the `context_ceiling` row:
    it reads the same true last T_text tokens as `context_tokens`, but was trained on them alone.
    """
    tokenizer = lens.loaded.tokenizer
    device = lens.device
    if mean_activation is None:
        mean_activation = train_mean(mean_split(cfg, lens))
    mean_activation = mean_activation.to(device)
    t_text = lens.cfg.train.t_text
    indices = sample_indices(len(dataset), cfg.eval.num_samples, cfg.seed)
    n = len(indices)
    size = cfg.eval.batch_size
    collate = CollateFn(pad_id=lens.loaded.pad_id)
    chunks = [indices[s : s + size] for s in range(0, n, size)]
    # Read and collated once for both passes; kept on the CPU, one chunk at a time on the device.
    batches = [collate([dataset[i] for i in chunk]) for chunk in chunks]

    # Pass 1: every explanation and Â, so that the shuffled baseline can pair any two samples.
    id_rows, hats = [], []
    for cpu_batch in batches:
        A = cpu_batch.A.to(device)
        ids, A_hat = lens.reconstruct(A, greedy=True)
        id_rows.append(ids.cpu())
        hats.append(A_hat.float())
    A_hat_all = torch.cat(hats)
    # Shuffled: sample i gets the Â of sample perm[i] under a derangement of the whole evaluated
    # set, so no sample is ever compared with itself, whatever the batch size.
    perm = derangement(n, cfg.seed)

    names = ["lens", "zero", "mean", "context_tokens"]
    names += (["context_ceiling"] if ceiling is not None else []) + (["shuffled"] if perm else [])
    kls: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    As, nlls, top5, ceiling_hats = [], [], [], []
    start = 0
    for chunk, cpu_batch, ids in zip(chunks, batches, id_rows, strict=True):
        batch = cpu_batch.to(device)
        A, rows = batch.A, slice(start, start + len(chunk))
        start += len(chunk)
        # Context tokens: E reads the true last T_text tokens ending at P (fewer, masked, when the
        # context is shorter). E was trained on D's texts only, so this is not an ideal decoder:
        # it shows how much of A the context's own words carry through this E.
        k = min(t_text, batch.input_ids_A.shape[1])
        ctx_ids, ctx_mask = batch.input_ids_A[:, -k:], batch.attention_mask_A[:, -k:]
        patches = {
            "lens": A_hat_all[rows],
            "zero": torch.zeros_like(A),
            "mean": mean_activation.to(A.dtype).expand_as(A),
            "context_tokens": lens.encode_ids(ctx_ids, ctx_mask),
        }
        if ceiling is not None:
            # The same input, read by an E trained on the true tokens alone: the fair reference.
            patches["context_ceiling"] = ceiling.encode_ids(ctx_ids, ctx_mask).to(A.dtype)
            ceiling_hats.append(patches["context_ceiling"].float().cpu())
        if perm:
            patches["shuffled"] = A_hat_all[perm[rows.start : rows.stop]]
        per_sample, clean = patched_kl(
            lens.orig,
            batch.input_ids_A,
            batch.attention_mask_A,
            A,
            [patches[name] for name in names],
            return_clean=True,
        )
        for name, kl in zip(names, per_sample, strict=True):
            kls[name].append(kl.cpu())
        top5.append(clean.float().topk(min(5, clean.shape[-1]), dim=-1).indices.cpu())
        # Fluency: M reads the explanation after a BOS token, so every explanation token is scored.
        nlls.append(lens.orig.text_nll(ids.to(device)).cpu())
        As.append(A.float().cpu())
    kl = {name: torch.cat(values) for name, values in kls.items()}
    A_all, A_hat_cpu = torch.cat(As), A_hat_all.cpu()
    ids_all = torch.cat(id_rows)
    texts = [tokenizer.decode(row) for row in ids_all.tolist()]
    cosine = metrics.cosine_per_sample(A_all, A_hat_cpu)
    boot, seed = cfg.eval.bootstrap, cfg.seed
    baselines = {
        name: _kl_row(kl["lens"], kl[name], boot, seed)
        for name in names[1:]
        if name != "context_ceiling"
    }
    if ceiling is not None:
        A_ceiling = torch.cat(ceiling_hats)
        baselines["context_ceiling"] = _ceiling_row(
            kl["lens"], kl["context_ceiling"], A_all, A_hat_cpu, A_ceiling, boot, seed
        )
    if not perm:
        baselines["shuffled"] = {
            "kl": None,
            "kl_ci": [],
            "kl_recovered": None,
            "kl_recovered_ci": [],
            "unavailable": UNAVAILABLE_SHUFFLED,
        }

    # Specificity: the explanation's words in its own sample's buckets vs a deranged sample's.
    window = cfg.eval.context_window
    explanations = [content_words(tokenizer, row) for row in ids_all.tolist()]
    contexts = [dataset.sample(i)[0] for i in indices]
    buckets = {
        "context": [content_words(tokenizer, c[-window:].tolist()) for c in contexts],
        "next_tokens": [content_words(tokenizer, dataset.next_tokens(i).tolist()) for i in indices],
        "top5": [content_words(tokenizer, row) for row in torch.cat(top5).tolist()],
    }
    spec = specificity(explanations, buckets, perm, boot, seed)
    shown = [
        {
            "index": int(i),
            "explanation": texts[j],
            "context": tokenizer.decode(contexts[j][-window:].tolist()),
            "next_tokens": tokenizer.decode(dataset.next_tokens(i).tolist()),
        }
        for j, i in enumerate(indices)
    ]
    spec["examples"] = bucket_examples(explanations, buckets, shown, cfg.eval.examples)
    spec["context_window"] = window
    top1 = top1_in_explanation(
        tokenizer, ids_all.tolist(), torch.cat(top5)[:, 0].tolist(), perm, boot, seed
    )
    for i, row in zip(indices, top1["per_sample"], strict=True):
        row["index"] = int(i)

    reference = constant_reference(A_all, A_hat_cpu, mean_activation.cpu(), boot, seed)
    return {
        "model": lens.cfg.model,
        "fingerprint": lens.loaded.fingerprint,
        "layer": lens.layer,
        "t_text": t_text,
        "num_samples": n,
        "split": str(dataset.path),
        "bootstrap": boot,
        "kl": {
            "mean": float(kl["lens"].mean()),
            "ci": list(metrics.mean_ci(kl["lens"], boot, seed)),
        },
        "baselines": baselines,
        "mse": metrics.mse(A_all, A_hat_cpu),
        "nmse": metrics.normalized_mse(A_all, A_hat_cpu),
        "fve": {
            "mean": metrics.fve(A_all, A_hat_cpu),
            "ci": list(
                metrics.bootstrap_ci(metrics.fve, A_all, A_hat_cpu, resamples=boot, seed=seed)
            ),
        },
        "cosine": {"mean": float(cosine.mean()), "ci": list(metrics.mean_ci(cosine, boot, seed))},
        "constant_mean": reference["constant"],
        "margin_over_constant": reference["margin"],
        "specificity": spec,
        "top1_in_explanation": top1,
        "perplexity": metrics.perplexity(torch.cat(nlls)),
        "diversity": {
            "fraction_unique": metrics.fraction_unique(texts),
            "distinct_1": metrics.distinct_n(ids_all.tolist(), 1),
            "distinct_2": metrics.distinct_n(ids_all.tolist(), 2),
        },
    }


def _above_zero(ci: list | None) -> bool:
    return bool(ci) and ci[0] == ci[0] and ci[0] > 0


def verdict_line(results: dict) -> str:
    """One line: does the lens beat its shuffled explanations and the constant train mean?"""
    shuffled = results["baselines"].get("shuffled", {})
    if shuffled.get("kl_recovered") is None:
        shuffled_text = "unavailable (" + shuffled.get("unavailable", "not measured") + ")"
    else:
        ci = shuffled["kl_recovered_ci"]
        yes = "yes" if _above_zero(ci) else "no"
        shuffled_text = (
            f"{yes} (kl_recovered {fmt(shuffled['kl_recovered'], 3)}, 95% CI {ci_text(ci)})"
        )
    margin = results.get("margin_over_constant", {}).get("fve")
    if margin is None:
        const_text = "not measured"
    else:
        yes = "yes" if _above_zero(margin["ci"]) else "no"
        const_text = f"{yes} (FVE margin {fmt(margin['value'], 3)}, 95% CI {ci_text(margin['ci'])})"
    return (
        f"**Beats its shuffled explanations:** {shuffled_text}; **beats the constant train mean "
        f"as Â:** {const_text}."
    )


def model_card(results: dict) -> str:
    """The model-card section with the eval numbers, in Markdown."""
    beats = [
        BASELINE_LABELS.get(name, name)
        for name, base in results["baselines"].items()
        if name != "shuffled" and _above_zero(base.get("kl_recovered_ci"))
    ]
    verdict = (
        "The lens beats " + ", ".join(beats) + " (95% CI of kl_recovered above zero)."
        if beats
        else "The lens does not beat any baseline with a 95% CI above zero."
    )
    shuffled = results["baselines"].get("shuffled")
    if (
        shuffled
        and shuffled.get("kl_recovered") is not None
        and not _above_zero(shuffled["kl_recovered_ci"])
    ):
        verdict += (
            " It does not beat its own explanations shuffled across samples, so its texts are not "
            "specific to their activations (mode collapse): what it gains is a better constant."
        )
    return (
        "## Evaluation\n\n"
        f"{verdict_line(results)}\n\n"
        f"Validation split `{results['split']}`, {results['num_samples']} samples, "
        f"{results['bootstrap']} bootstrap resamples. KL is KL(M(A) ‖ M(·)) of the frozen model's "
        "next-token distribution at P when block L's output there is replaced.\n\n"
        + markdown_tables(results)
        + f"\n{verdict}\n"
    )


def _inside(path: Path, directory: Path) -> bool:
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def refuse_lens_dir(out: Path, lens_dir: Path, what: str) -> None:
    """The lens directory is read-only to eval and explain: refuse an output inside it."""
    if _inside(out, lens_dir):
        raise LensError(
            f"{what} '{out}' is inside the lens directory '{lens_dir}', which eval and explain "
            "never write; pass another directory (--output DIR), and use `consistency-lens card` "
            "to put results in the lens's card."
        )


def default_output(cfg: LensConfig, lens) -> Path:
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
    mean_set = mean_split(cfg, lens)
    ceiling = load_ceiling(lens, path)
    results = evaluate(lens, dataset, cfg, train_mean(mean_set), ceiling and ceiling[0])
    if ceiling is not None:
        results["baselines"]["context_ceiling"]["trained"] = ceiling[1].get("trained")
    results["checkpoint"] = str(path)
    results["mean_split"] = str(mean_set.path)
    results["lens_weights_sha256"] = read_json(path / CONFIG_FILE, "Lens config").get(
        "weights_sha256"
    )
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
