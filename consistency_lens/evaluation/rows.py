"""The eval's result rows: each baseline's KL and the lens's kl_recovered over it, the context
ceiling's row, and the constant-mean reference with the lens's margin over it, all with CIs."""

from __future__ import annotations

import torch

from consistency_lens.evaluation import metrics

UNAVAILABLE_SHUFFLED = (
    "needs at least 2 evaluated samples (a derangement of 1 sample does not exist)"
)


def baseline_rows(
    kl: dict[str, torch.Tensor],
    A: torch.Tensor,
    A_hat: torch.Tensor,
    A_ceiling: torch.Tensor | None,
    A_ceiling_text: torch.Tensor | None,
    boot: int,
    seed: int,
) -> dict:
    """Every baseline's row by name, from per-sample KLs keyed by patch name ("lens" first);
    `A_ceiling` / `A_ceiling_text`: the ceiling's E reading the true tokens / the lens's text."""
    rows = {
        name: _kl_row(kl["lens"], kl[name], boot, seed)
        for name in kl
        if name not in ("lens", "context_ceiling", "ceiling_reads_lens")
    }
    if A_ceiling is not None:
        rows["context_ceiling"] = _ceiling_row(
            kl["lens"], kl["context_ceiling"], A, A_hat, A_ceiling, boot, seed
        )
        rows["context_ceiling"]["reads_lens_text"] = _reader_row(
            kl["ceiling_reads_lens"], kl["context_ceiling"], A, A_ceiling_text, boot, seed
        )
    if "shuffled" not in kl:
        rows["shuffled"] = {
            "kl": None,
            "kl_ci": [],
            "kl_recovered": None,
            "kl_recovered_ci": [],
            "unavailable": UNAVAILABLE_SHUFFLED,
        }
    return rows


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


def _reader_row(
    kl_text: torch.Tensor,
    kl_true: torch.Tensor,
    A: torch.Tensor,
    A_text: torch.Tensor,
    boot: int,
    seed: int,
) -> dict:
    """The ceiling's E reading the lens's text: its KL and FVE, and its kl_recovered over the
    same E reading the true tokens (below 0: the text tells that reader less than the words)."""
    return {
        "kl": float(kl_text.mean()),
        "kl_ci": list(metrics.mean_ci(kl_text, boot, seed)),
        "kl_recovered": metrics.kl_recovered(kl_text, kl_true),
        "kl_recovered_ci": list(metrics.kl_recovered_ci(kl_text, kl_true, boot, seed)),
        **_fve_fields(A, A_text, boot, seed),
    }


def _fve_fields(A: torch.Tensor, A_hat: torch.Tensor, boot: int, seed: int) -> dict:
    """FVE of Â and its bootstrap CI."""
    return {
        "fve": metrics.fve(A, A_hat),
        "fve_ci": list(metrics.bootstrap_ci(metrics.fve, A, A_hat, resamples=boot, seed=seed)),
    }


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
        **_fve_fields(A, A_ceiling, boot, seed),
        "kl_gap": float(gap.mean()),
        "kl_gap_ci": list(metrics.mean_ci(gap, boot, seed)),
        "fve_gap": fve_gap(A, A_hat, A_ceiling),
        "fve_gap_ci": list(
            metrics.bootstrap_ci(fve_gap, A, A_hat, A_ceiling, resamples=boot, seed=seed)
        ),
    }
