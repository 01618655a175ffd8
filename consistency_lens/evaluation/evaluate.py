"""`consistency-lens eval`: how faithful a lens is, against zero, mean and context-token baselines."""

from __future__ import annotations

from pathlib import Path

import torch

from consistency_lens.config import LensConfig
from consistency_lens.data.collate import CollateFn
from consistency_lens.errors import LensError
from consistency_lens.evaluation import metrics
from consistency_lens.evaluation.samples import (
    log_samples_wandb,
    qualitative_samples,
    sample_indices,
    write_samples,
)
from consistency_lens.evaluation.tables import BASELINE_NAMES as BASELINE_LABELS
from consistency_lens.evaluation.tables import markdown_tables, print_rich
from consistency_lens.utils.io import atomic_write_json

BASELINES = ("zero", "mean", "context_tokens", "shuffled")


def default_checkpoint(cfg: LensConfig) -> Path:
    """The lens directory `train` writes: `<train.run_dir>/lens`."""
    return Path(cfg.train.run_dir) / "lens"


def load_lens(cfg: LensConfig, checkpoint: Path | None):
    """Load a saved lens directory (default `<train.run_dir>/lens`) on `cfg.device`."""
    from consistency_lens.models.lens import ConsistencyLens

    path = Path(checkpoint) if checkpoint is not None else default_checkpoint(cfg)
    if not (path / "lens_config.json").is_file():
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
    """`cfg` with the model and layer the lens was trained on (a lens directory is self-describing)."""
    return cfg.model_copy(update={"model": lens.cfg.model, "layer": lens.layer})


def open_split(cfg: LensConfig, lens, split: str, seed: int = 0):
    """The dump split matching the lens's model and layer, or a clear error."""
    from consistency_lens.data.dataset import ActivationDataset
    from consistency_lens.data.dump import split_dir

    path = split_dir(eval_config(cfg, lens), split)
    if not (path / "metadata.json").is_file():
        raise LensError(
            f"No {split} split at '{path}' for model '{lens.cfg.model}' layer {lens.layer}; run "
            f"`consistency-lens dump model={lens.cfg.model} layer={lens.layer}` (with val_samples > 0)."
        )
    dataset = ActivationDataset(path, seed=seed)
    meta = dataset.metadata
    if (
        dataset.d_model != lens.d_model
        or meta.get("layer") != lens.layer
        or meta.get("fingerprint") != lens.loaded.fingerprint
    ):
        raise LensError(
            f"Dump '{path}' (layer {meta.get('layer')}, width {dataset.d_model}, model "
            f"{meta.get('fingerprint')}) does not match the lens (layer {lens.layer}, width "
            f"{lens.d_model}, model {lens.loaded.fingerprint}); dump with the lens's model."
        )
    return dataset


def train_mean(dataset) -> torch.Tensor:
    """Per-feature mean of A over a whole split, read shard by shard (the mean-ablation vector)."""
    total = torch.zeros(dataset.d_model, dtype=torch.float64)
    count = 0
    for shard in dataset.shards:
        acts = shard.handle.get_tensor("A").double()
        total += acts.sum(0)
        count += acts.shape[0]
    return (total / count).float()


def _bos(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    return 0


@torch.no_grad()
def evaluate(lens, dataset, cfg: LensConfig, mean_activation: torch.Tensor | None = None) -> dict:
    """KL of the lens and of each baseline, reconstruction metrics, fluency and diversity."""
    tokenizer = lens.loaded.tokenizer
    device = lens.device
    if mean_activation is None:
        mean_activation = train_mean(open_split(cfg, lens, "train"))
    mean_activation = mean_activation.to(device)
    t_text = lens.cfg.train.t_text
    indices = sample_indices(len(dataset), cfg.eval.num_samples, cfg.seed)
    collate = CollateFn(pad_id=lens.loaded.pad_id)
    kls: dict[str, list[torch.Tensor]] = {k: [] for k in ("lens", *BASELINES)}
    As, A_hats, nlls, texts, id_lists = [], [], [], [], []
    bos = _bos(tokenizer)
    for start in range(0, len(indices), cfg.eval.batch_size):
        batch = collate([dataset[i] for i in indices[start : start + cfg.eval.batch_size]])
        batch = batch.to(device)
        A = batch.A
        ids, A_hat = lens.reconstruct(A, greedy=True)
        # Context baseline: E reads the true T_text tokens ending at P (fewer, masked, when the
        # context is shorter), i.e. the text an ideal decoder could copy from the context.
        k = min(t_text, batch.input_ids_A.shape[1])
        A_ctx = lens.encode_ids(batch.input_ids_A[:, -k:], batch.attention_mask_A[:, -k:])
        vectors = [
            A,
            A_hat,
            torch.zeros_like(A),
            mean_activation.to(A.dtype).expand_as(A),
            A_ctx,
            # Another sample's reconstruction: equal to the lens when D writes the same text for
            # every activation (mode collapse), so beating it shows the text is specific to A.
            A_hat.roll(1, dims=0),
        ]
        logits = lens.orig.forward_with_replacement(
            batch.input_ids_A, batch.attention_mask_A, vectors
        )
        for name, other in zip(("lens", *BASELINES), logits[1:], strict=True):
            kls[name].append(metrics.kl_per_sample(logits[0], other).cpu())
        # Fluency: M reads the explanation after a BOS token, so every explanation token is scored.
        prefixed = torch.cat([torch.full_like(ids[:, :1], bos), ids], dim=1)
        token_logits = lens.orig.token_logits(prefixed)
        nlls.append(metrics.token_nll(token_logits[:, :-1], ids).cpu())
        As.append(A.float().cpu())
        A_hats.append(A_hat.float().cpu())
        for row in ids.tolist():
            id_lists.append(row)
            texts.append(tokenizer.decode(row))
    kl = {name: torch.cat(values) for name, values in kls.items()}
    A_all, A_hat_all = torch.cat(As), torch.cat(A_hats)
    cosine = metrics.cosine_per_sample(A_all, A_hat_all)
    boot = cfg.eval.bootstrap
    seed = cfg.seed
    baselines = {}
    for name in BASELINES:
        baselines[name] = {
            "kl": float(kl[name].mean()),
            "kl_ci": list(metrics.mean_ci(kl[name], boot, seed)),
            "kl_recovered": metrics.kl_recovered(kl["lens"], kl[name]),
            "kl_recovered_ci": list(metrics.kl_recovered_ci(kl["lens"], kl[name], boot, seed)),
        }
    return {
        "model": lens.cfg.model,
        "layer": lens.layer,
        "t_text": t_text,
        "num_samples": len(indices),
        "split": str(dataset.path),
        "bootstrap": boot,
        "kl": {
            "mean": float(kl["lens"].mean()),
            "ci": list(metrics.mean_ci(kl["lens"], boot, seed)),
        },
        "baselines": baselines,
        "mse": metrics.mse(A_all, A_hat_all),
        "nmse": metrics.normalized_mse(A_all, A_hat_all),
        "fve": {
            "mean": metrics.fve(A_all, A_hat_all),
            "ci": list(
                metrics.bootstrap_ci(metrics.fve, A_all, A_hat_all, resamples=boot, seed=seed)
            ),
        },
        "cosine": {"mean": float(cosine.mean()), "ci": list(metrics.mean_ci(cosine, boot, seed))},
        "perplexity": metrics.perplexity(torch.cat(nlls)),
        "diversity": {
            "fraction_unique": metrics.fraction_unique(texts),
            "distinct_1": metrics.distinct_n(id_lists, 1),
            "distinct_2": metrics.distinct_n(id_lists, 2),
        },
    }


def model_card(results: dict) -> str:
    """The model-card section with the eval numbers, in Markdown."""
    beats = [
        BASELINE_LABELS.get(name, name)
        for name, base in results["baselines"].items()
        if name != "shuffled" and base["kl_recovered_ci"] and base["kl_recovered_ci"][0] > 0
    ]
    verdict = (
        "The lens beats " + ", ".join(beats) + " (95% CI of kl_recovered above zero)."
        if beats
        else "The lens does not beat any baseline with a 95% CI above zero."
    )
    shuffled = results["baselines"].get("shuffled")
    if shuffled and not (shuffled["kl_recovered_ci"] and shuffled["kl_recovered_ci"][0] > 0):
        verdict += (
            " It does not beat its own explanations shuffled across samples, so its texts are not "
            "specific to their activations (mode collapse): what it gains is a better constant."
        )
    return (
        "## Evaluation\n\n"
        f"Validation split `{results['split']}`, {results['num_samples']} samples, "
        f"{results['bootstrap']} bootstrap resamples. KL is KL(M(A) ‖ M(·)) of the frozen model's "
        "next-token distribution at P when block L's output there is replaced.\n\n"
        + markdown_tables(results)
        + f"\n{verdict}\n"
    )


def evaluate_command(cfg: LensConfig, checkpoint: Path | None) -> dict:
    """Evaluate a saved lens, write eval_results.json, samples and the model card, print tables."""
    lens, path = load_lens(cfg, checkpoint)
    dataset = open_split(cfg, lens, "val", seed=cfg.seed)
    results = evaluate(lens, dataset, cfg)
    results["checkpoint"] = str(path)
    run_dir = Path(cfg.train.run_dir)
    atomic_write_json(run_dir / "eval_results.json", results)
    records = qualitative_samples(lens, dataset, cfg)
    jsonl, html_path = write_samples(records, run_dir)
    if cfg.wandb.enabled and records:
        log_samples_wandb(records, cfg)
    # The card travels with the lens directory, so a shared lens carries its own numbers.
    lens.write_card(path, model_card(results))
    atomic_write_json(path / "eval_results.json", results)
    print_rich(results)
    print(f"results: {run_dir / 'eval_results.json'}\nsamples: {html_path} ({jsonl.name})")
    return results
