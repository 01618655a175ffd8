"""The eval's measurement: how faithful a lens is on fixed samples of a split, against zero, mean,
context-token and shuffled baselines (and the context ceiling when given), with a constant
reconstruction, specificity, fluency and diversity (docs/design.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from consistency_lens.config import LensConfig
from consistency_lens.data.collate import Batch, CollateFn
from consistency_lens.evaluation import metrics
from consistency_lens.evaluation.rows import baseline_rows, constant_reference
from consistency_lens.evaluation.samples import sample_indices
from consistency_lens.evaluation.specificity import (
    bucket_examples,
    specificity,
    top1_in_explanation,
)
from consistency_lens.evaluation.splits import lens_mean
from consistency_lens.models.patching import patched_kl
from consistency_lens.utils.words import TOP_PREDICTIONS, content_words

if TYPE_CHECKING:
    from consistency_lens.data.dataset import ActivationDataset
    from consistency_lens.models.lens import ConsistencyLens
    from consistency_lens.models.orig import OriginalModelWrapper


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


@torch.no_grad()
def evaluate(
    lens: ConsistencyLens,
    dataset: ActivationDataset,
    cfg: LensConfig,
    mean_activation: torch.Tensor | None = None,
    ceiling: torch.nn.Module | None = None,
) -> dict:
    """KL of the lens and of each baseline, reconstruction against a constant, specificity,
    fluency and diversity, on `eval.num_samples` fixed samples of `dataset`.

    `ceiling` (the encoder `models.ceiling.load_ceiling` returns) adds the `context_ceiling` row:
    it reads the same true last T_text tokens as `context_tokens`, but was trained on them alone;
    its `reads_lens_text` (and `per_sample`'s `reader_kl`, `reader_sq_err`) is the same encoder
    reading the lens's own text, as the lens's E reads it.
    """
    if mean_activation is None:
        mean_activation = lens_mean(cfg, lens)[0]
    mean_activation = mean_activation.to(lens.device)
    indices = sample_indices(len(dataset), cfg.eval.num_samples, cfg.seed)
    size = cfg.eval.batch_size
    collate = CollateFn(pad_id=lens.loaded.pad_id)
    # Read and collated once for both passes; kept on the CPU, one chunk at a time on the device.
    batches = [
        collate([dataset[i] for i in indices[s : s + size]]) for s in range(0, len(indices), size)
    ]
    id_rows, A_hat = _explain(lens, batches)
    # Shuffled: sample i gets the Â of sample perm[i] under a derangement of the whole evaluated
    # set, so no sample is ever compared with itself, whatever the batch size.
    perm = derangement(len(indices), cfg.seed)
    patched = _patched_pass(lens, batches, id_rows, A_hat, mean_activation, ceiling, perm)
    A, A_hat = patched.A, A_hat.cpu()
    ids = torch.cat(id_rows)
    texts = [lens.loaded.tokenizer.decode(row) for row in ids.tolist()]
    boot, seed = cfg.eval.bootstrap, cfg.seed
    spec, top1 = _specificity(lens, dataset, cfg, indices, ids, texts, patched.top5, perm)
    # Kept with the other per-sample figures, out of the specificity tables.
    hits = spec.pop("per_sample")
    reference = constant_reference(A, A_hat, mean_activation.cpu(), boot, seed)
    baselines = baseline_rows(
        patched.kl, A, A_hat, patched.ceiling_hat, patched.ceiling_text_hat, boot, seed
    )
    if ceiling is not None:
        # The order the ceiling read the lens's text in: part of which reader it was.
        baselines["context_ceiling"]["reads_lens_text"]["rotate"] = lens.encoder.rotate
    return {
        "model": lens.cfg.model,
        "fingerprint": lens.loaded.fingerprint,
        "layer": lens.layer,
        "t_text": lens.cfg.train.t_text,
        "decode": lens.cfg.decode.filled().model_dump(),
        "num_samples": len(indices),
        "split": str(dataset.path),
        # What the split holds (its sequences and positions), wherever it is read from.
        "split_sha256": dataset.metadata.get("plan_sha256"),
        "bootstrap": boot,
        "kl": {
            "mean": float(patched.kl["lens"].mean()),
            "ci": list(metrics.mean_ci(patched.kl["lens"], boot, seed)),
        },
        "baselines": baselines,
        **_reconstruction(A, A_hat, boot, seed),
        "constant_mean": reference["constant"],
        "margin_over_constant": reference["margin"],
        "specificity": spec,
        "top1_in_explanation": top1,
        "perplexity": metrics.perplexity(patched.nll),
        "perplexity_context": _context_perplexity(patched.context_nll),
        "diversity": {
            "fraction_unique": metrics.fraction_unique(texts),
            "distinct_1": metrics.distinct_n(ids.tolist(), 1),
            "distinct_2": metrics.distinct_n(ids.tolist(), 2),
        },
        "per_sample": {
            **_per_sample(indices, patched.kl["lens"], A, A_hat, patched.nll),
            **_reader_per_sample(patched, A),
            **hits,
        },
    }


def _reader_per_sample(patched: _Patched, A: torch.Tensor) -> dict:
    """The ceiling's E reading the lens's text, per sample (KL at P, ‖A − Â‖²), so two decodes
    of one lens compare paired on a reader that chose neither; empty without a ceiling."""
    if patched.ceiling_text_hat is None:
        return {}
    return {
        "reader_kl": patched.kl["ceiling_reads_lens"].float().tolist(),
        "reader_sq_err": _sq_err(A, patched.ceiling_text_hat).tolist(),
    }


def _sq_err(A: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """‖A − Â‖² per sample, in fp32."""
    return ((A.float() - A_hat.float()) ** 2).sum(-1)


def _per_sample(
    indices: list[int], kl: torch.Tensor, A: torch.Tensor, A_hat: torch.Tensor, nll: torch.Tensor
) -> dict:
    """Each sample's own figures, so two lenses' results on the same samples compare paired
    (`evaluation.compare`): KL at P, ‖A − Â‖², ‖A − mean(A)‖² (FVE = 1 − Σ first / Σ second)
    and the explanation's mean NLL per token under M (the specificity's word counts and hits
    are added beside them)."""
    A = A.float()
    return {
        "index": [int(i) for i in indices],
        "kl": kl.float().tolist(),
        "sq_err": _sq_err(A, A_hat).tolist(),
        "sq_dev": ((A - A.mean(0, keepdim=True)) ** 2).sum(-1).tolist(),
        "nll": nll.float().tolist(),
    }


def _explain(
    lens: ConsistencyLens, batches: list[Batch]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pass 1: every explanation (CPU id rows) and Â, so the shuffled baseline can pair any two."""
    id_rows, hats = [], []
    for cpu_batch in batches:
        ids, A_hat = lens.reconstruct(cpu_batch.A.to(lens.device), greedy=True)
        id_rows.append(ids.cpu())
        hats.append(A_hat.float())
    return id_rows, torch.cat(hats)


@dataclass
class _Patched:
    """What pass 2 measured, one row per evaluated sample, on the CPU."""

    kl: dict[str, torch.Tensor]
    """Per-sample KL(M(A) || M(X)) for each patch X by name, the lens's Â first."""
    A: torch.Tensor
    nll: torch.Tensor
    """M's per-token NLL of each explanation (fluency)."""
    context_nll: torch.Tensor
    """M's per-token NLL of each sample's true last T_text context tokens, read as the explanations
    are (NaN where the context is shorter): the fluency of the words a lens would copy."""
    top5: torch.Tensor
    """M's five most likely next tokens at P under the clean run."""
    ceiling_hat: torch.Tensor | None
    ceiling_text_hat: torch.Tensor | None
    """The ceiling's E reading each explanation (as shown), where there is a ceiling."""


def _patched_pass(
    lens: ConsistencyLens,
    batches: list[Batch],
    id_rows: list[torch.Tensor],
    A_hat: torch.Tensor,
    mean_activation: torch.Tensor,
    ceiling: torch.nn.Module | None,
    perm: list[int] | None,
) -> _Patched:
    """Pass 2: M's KL at P with A replaced by Â and by each baseline, chunk by chunk."""
    device, t_text = lens.device, lens.cfg.train.t_text
    names = ["lens", "zero", "mean", "context_tokens"]
    names += ["context_ceiling", "ceiling_reads_lens"] if ceiling is not None else []
    names += ["shuffled"] if perm else []
    kls: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    As, nlls, context_nlls, top5, ceiling_hats, ceiling_text_hats = [], [], [], [], [], []
    start = 0
    for cpu_batch, ids in zip(batches, id_rows, strict=True):
        batch = cpu_batch.to(device)
        A, rows = batch.A, slice(start, start + len(ids))
        start += len(ids)
        # Context tokens: E reads the true last T_text tokens ending at P (fewer, masked, when the
        # context is shorter). E was trained on D's texts only, so this is not an ideal decoder:
        # it shows how much of A the context's own words carry through this E. Both rows read
        # them in order, ending on the token at P, even where E reads D's text rotated
        # (`train.encoder_rotate`): D's texts then end on that token once rotated.
        ctx_ids, ctx_mask = batch.last_context(t_text)
        patches = {
            "lens": A_hat[rows],
            "zero": torch.zeros_like(A),
            "mean": mean_activation.to(A.dtype).expand_as(A),
            "context_tokens": lens.encode_ids(ctx_ids, ctx_mask, rotate=0),
        }
        if ceiling is not None:
            # The same input, read by an E trained on the true tokens alone: the fair reference.
            patches["context_ceiling"] = ceiling.encode_ids(ctx_ids, ctx_mask, rotate=0).to(A.dtype)
            ceiling_hats.append(patches["context_ceiling"].float().cpu())
            # The lens's own text read by that E, which never saw D's texts and took no part in
            # choosing them (`decode.reconstruction` chooses with the lens's own E). It
            # reads the text as the lens's E does (`train.encoder_rotate`), so it ends on the
            # token at P, where the ceiling learnt to read the true context.
            text_hat = ceiling.encode_ids(ids.to(device), rotate=lens.encoder.rotate).to(A.dtype)
            patches["ceiling_reads_lens"] = text_hat
            ceiling_text_hats.append(text_hat.float().cpu())
        if perm:
            patches["shuffled"] = A_hat[perm[rows.start : rows.stop]]
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
        top5.append(clean.float().topk(min(TOP_PREDICTIONS, clean.shape[-1]), dim=-1).indices.cpu())
        # Fluency: M reads the explanation after a BOS token, so every explanation token is scored.
        nlls.append(lens.orig.text_nll(ids.to(device)).cpu())
        context_nlls.append(context_text_nll(lens.orig, ctx_ids, ctx_mask, t_text).cpu())
        As.append(A.float().cpu())
    return _Patched(
        kl={name: torch.cat(values) for name, values in kls.items()},
        A=torch.cat(As),
        nll=torch.cat(nlls),
        context_nll=torch.cat(context_nlls),
        top5=torch.cat(top5),
        ceiling_hat=torch.cat(ceiling_hats) if ceiling is not None else None,
        ceiling_text_hat=torch.cat(ceiling_text_hats) if ceiling is not None else None,
    )


def context_text_nll(
    orig: OriginalModelWrapper, ctx_ids: torch.Tensor, ctx_mask: torch.Tensor, t_text: int
) -> torch.Tensor:
    """M's mean NLL (B,) of each row's last context tokens read as an explanation is (after BOS),
    NaN for a row with fewer than `t_text` real tokens (`last_context` clips to the batch width, so
    a row can be all real and still short)."""
    full = ctx_mask.sum(dim=1) == t_text
    return torch.where(full, orig.text_nll(ctx_ids).float(), float("nan"))


def _context_perplexity(context_nll: torch.Tensor) -> dict:
    """The perplexity baseline: M's perplexity of the true last T_text context tokens, over the
    samples whose context has that many (a lens copying the context exactly would read so)."""
    kept = context_nll[~context_nll.isnan()]
    value = metrics.perplexity(kept) if len(kept) else None
    return {"value": value, "samples": len(kept)}


def _reconstruction(A: torch.Tensor, A_hat: torch.Tensor, boot: int, seed: int) -> dict:
    """How close Â is to A: MSE, normalized MSE, FVE and cosine (the last two with CIs)."""
    cosine = metrics.cosine_per_sample(A, A_hat)
    return {
        "mse": metrics.mse(A, A_hat),
        "nmse": metrics.normalized_mse(A, A_hat),
        "fve": {
            "mean": metrics.fve(A, A_hat),
            "ci": list(metrics.bootstrap_ci(metrics.fve, A, A_hat, resamples=boot, seed=seed)),
        },
        "cosine": {"mean": float(cosine.mean()), "ci": list(metrics.mean_ci(cosine, boot, seed))},
    }


def _specificity(
    lens: ConsistencyLens,
    dataset: ActivationDataset,
    cfg: LensConfig,
    indices: list[int],
    ids: torch.Tensor,
    texts: list[str],
    top5: torch.Tensor,
    perm: list[int] | None,
) -> tuple[dict, dict]:
    """The explanation's words in its own sample's buckets vs a deranged sample's, and whether
    M's top-1 next token appears in the explanation."""
    tokenizer, window = lens.loaded.tokenizer, cfg.eval.context_window
    boot, seed = cfg.eval.bootstrap, cfg.seed
    explanations = [content_words(tokenizer, row) for row in ids.tolist()]
    contexts = [dataset.sample(i)[0] for i in indices]
    buckets = {
        "context": [content_words(tokenizer, c[-window:].tolist()) for c in contexts],
        "next_tokens": [content_words(tokenizer, dataset.next_tokens(i).tolist()) for i in indices],
        "top5": [content_words(tokenizer, row) for row in top5.tolist()],
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
    top1 = top1_in_explanation(tokenizer, ids.tolist(), top5[:, 0].tolist(), perm, boot, seed)
    for i, row in zip(indices, top1["per_sample"], strict=True):
        row["index"] = int(i)
    return spec, top1
