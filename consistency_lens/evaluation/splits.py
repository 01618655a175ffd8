"""The dump splits eval reads for a lens: the validation split it is measured on (dumped here when
missing) and, for a lens that does not carry its training mean, the train split its mean-ablation
vector comes from."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from consistency_lens.config import LensConfig
from consistency_lens.data.layout import METADATA, check_matches, split_dir
from consistency_lens.errors import LensError
from consistency_lens.evaluation.saved_lens import eval_config

if TYPE_CHECKING:
    from consistency_lens.data.dataset import ActivationDataset
    from consistency_lens.models.lens import ConsistencyLens


def _dump_command(cfg: LensConfig) -> str:
    return (
        f"consistency-lens dump model={cfg.model} layer={cfg.layer} corpus={cfg.corpus} "
        f"output_dir={cfg.output_dir}"
    )


def _split_dir(cfg: LensConfig, split: str) -> Path:
    return split_dir(cfg.output_dir, cfg.model, cfg.layer, cfg.corpus, split)


def open_split(
    cfg: LensConfig, lens: ConsistencyLens, split: str, seed: int = 0, dump_missing: bool = False
) -> ActivationDataset:
    """The dump split of `cfg.corpus` for the lens's model and layer.

    With `dump_missing`, a missing val split is dumped here (with the lens's own model), so a lens
    is checked on text of another genre in one command; otherwise a missing split is a clear error.
    """
    from consistency_lens.data.dataset import ActivationDataset
    from consistency_lens.data.dump import dump_activations

    ecfg = eval_config(cfg, lens)
    path = _split_dir(ecfg, split)
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


def mean_split(cfg: LensConfig, lens: ConsistencyLens) -> ActivationDataset:
    """The train split the lens was trained on (its corpus, under `cfg.output_dir` or its own)."""
    from consistency_lens.data.dataset import ActivationDataset

    own = {"corpus": lens.cfg.corpus, "corpus_split": lens.cfg.corpus_split}
    candidates = [
        _split_dir(eval_config(cfg, lens).model_copy(update=own), "train"),
        _split_dir(lens.cfg, "train"),
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


def lens_mean(cfg: LensConfig, lens: ConsistencyLens) -> tuple[torch.Tensor, Path | None]:
    """The mean-ablation vector of `lens` and the train split it was read from: the training mean
    the lens carries (split None), else the mean over its training corpus's train split."""
    if lens.train_mean is not None:
        return lens.train_mean, None
    dataset = mean_split(cfg, lens)
    return dataset.mean_activation(), dataset.path
