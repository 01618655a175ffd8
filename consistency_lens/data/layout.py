"""The dump's on-disk format, in one place for its writer (`dump.py`) and its readers.

A split lives in `split_dir(output_dir, model, layer, corpus, split)` = `<output_dir>/<model>/layer_<L>/<corpus>_<split>/` and
holds `metadata.json` (the `split_header` settings plus counts and shard checksums),
`progress.json` (what a resumed dump may keep) and `shard_NNNNN.safetensors` files with `A` (n, d),
`input_ids` (flat contexts 0..P), `offsets`, `positions`, `seq_index`, `input_ids_next` and
`next_offsets`, and, for a config whose training runs `warm_start_predict`, `predicted_ids` (n, k):
M's continuation after P, as the header's `predicted` says (`prediction_header`); under torchrun
each rank writes `rank_<k>/` and rank 0 the global metadata.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from consistency_lens.config import DUMP_KEYS, LensConfig, dump_config, setting
from consistency_lens.data.corpus import corpus_slug, tokenizer_hash
from consistency_lens.errors import LensError
from consistency_lens.models.loading import LoadedModel, model_slug
from consistency_lens.utils.words import TOP_PREDICTIONS

if TYPE_CHECKING:
    from consistency_lens.data.dataset import ActivationDataset
    from consistency_lens.models.lens import ConsistencyLens
    from consistency_lens.models.orig import OriginalModelWrapper

FORMAT_VERSION = 2
"""2 adds `input_ids_next` (the corpus tokens after P); version-1 dumps must be dumped again."""
SPLITS = ("train", "val")
METADATA = "metadata.json"
PROGRESS = "progress.json"
PREDICTED = "predicted"
"""Header key of the stored continuation (`prediction_header`); absent where none is stored, so
the header of a dump without one is what it was before the dump could store one."""

# Header names of the config's `DUMP_KEYS` where the header calls them otherwise: the dump stores
# `train.t_text` corpus tokens after P per sample (`input_ids_next`), e.g. for teacher forcing.
_HEADER_NAMES = {"train.t_text": "next_tokens"}

# Settings that must match for a rerun to resume an existing dump: the config's `DUMP_KEYS` (as
# the header names them), then what the header derives from the model and corpus. `plan_sha256`
# (a digest of the split's sequences, positions and indices) is last: it catches what the named
# keys cannot, e.g. a corpus edited without changing its size or mtime. `PREDICTED` is not one: it
# decides no sample, and a resumed dump keeps the one it was started with (`dump._resume_state`).
RESUME_KEYS = (
    "format_version",
    *(_HEADER_NAMES.get(key, key) for key in DUMP_KEYS),
    "fingerprint",
    "corpus_key",
    "num_requested",
    "tokenizer",
    "tokenizer_hash",
    "world_size",
    "plan_sha256",
)


# Header keys that decide which corpus sequences a split drew: train and val must share them,
# or they are not two splits of the same dump.
SAME_DUMP_KEYS = (
    "corpus_key",
    "seed",
    "num_samples",
    "val_samples",
    "seq_len",
    "fingerprint",
    "layer",
)


def split_dir(output_dir: str | Path, model: str, layer: int, corpus: str, split: str) -> Path:
    """`<output_dir>/<model>/layer_<L>/<corpus>_<split>/`."""
    return (
        Path(output_dir) / model_slug(model) / f"layer_{layer}" / f"{corpus_slug(corpus)}_{split}"
    )


def stored_prediction(cfg: LensConfig) -> tuple[int, str] | None:
    """(`train.predict.tokens`, `train.predict.first`) when `cfg`'s training runs
    `warm_start_predict` (as its objective or its warm start's), whose targets the dump then stores
    (`predicted_ids`) instead of the objective running M over each batch; else None."""
    if "warm_start_predict" not in cfg.train.objectives():
        return None
    predict = cfg.train.predict
    return predict.tokens, predict.first


def prediction_header(tokens: int, first: str, orig: OriginalModelWrapper) -> dict:
    """The header's `predicted`: what makes a stored continuation equal the one the objective
    computes with M. Its length and first-token rule, the dtype M runs in and whether it is
    8-bit, and for `content` a digest of the rule's inputs (M's content-word ids, from the
    tokenizer and `utils.words`, and the top count), which code may change; M's weights are
    pinned by the header's `fingerprint`."""
    # How M computes, beyond its weights: a bf16 or 8-bit M may flip a near tie of fp32's.
    m = orig.model
    header: dict = {
        "tokens": tokens,
        "first": first,
        "m_dtype": str(m.dtype).removeprefix("torch."),
        "m_8bit": bool(getattr(m, "is_loaded_in_8bit", False)),
    }
    if first == "content":
        digest = hashlib.sha256(TOP_PREDICTIONS.to_bytes(8, "little"))
        digest.update(orig.content_word_ids().cpu().numpy().astype("<i8").tobytes())
        header["content_words_sha256"] = digest.hexdigest()
    return header


def split_header(
    cfg: LensConfig,
    loaded: LoadedModel,
    corpus_key: str,
    split: str,
    n: int,
    plan_sha256: str,
    world: int,
    predicted: dict | None = None,
) -> dict:
    """The settings part of a split's metadata (and of its progress file): what the split holds.

    `metadata.json` adds `count`, `drawn`, `filtered_high_norm`, `skipped_short_sequences`, the
    dump's `config`, and either `shards` (file, count, kept, sha256 each) or, under torchrun,
    `ranks` (the `rank_<k>/` directories, each with its own metadata and shards). `predicted`
    (`prediction_header`) is there only when the shards store M's continuation.
    """
    # The declared dump settings, as the config holds them; `p_min` as the dump applies it.
    declared = {_HEADER_NAMES.get(key, key): setting(dump_config(cfg), key) for key in DUMP_KEYS}
    if split != "train":
        # Val keeps one position per sequence whatever the config says (`dump.plan_splits`), so
        # its header, and a val split dumped by eval for any lens, do not depend on it.
        declared["positions_per_sequence"] = 1
    return {
        "format_version": FORMAT_VERSION,
        **declared,
        "plan_sha256": plan_sha256,
        "world_size": world,
        "fingerprint": loaded.fingerprint,
        "num_blocks": loaded.parts.num_blocks,
        "d_model": loaded.parts.d_model,
        "p_min": cfg.p_min_effective,
        "p_max": cfg.seq_len - 2,
        "corpus_key": corpus_key,
        "split": split,
        "num_requested": n,
        "tokenizer": getattr(loaded.tokenizer, "name_or_path", ""),
        "tokenizer_hash": tokenizer_hash(loaded.tokenizer),
        "pad_token_id": loaded.tokenizer.pad_token_id,
        **({PREDICTED: predicted} if predicted is not None else {}),
    }


def check_same_dump(train: ActivationDataset, val: ActivationDataset) -> None:
    """Refuse train and val splits of different dumps, or any sequence in both (a silent leak)."""
    for key in SAME_DUMP_KEYS:
        if train.metadata.get(key) != val.metadata.get(key):
            raise LensError(
                f"The train split '{train.path}' and the val split '{val.path}' come from "
                f"different dumps ({key}={train.metadata.get(key)!r} vs "
                f"{val.metadata.get(key)!r}); delete both and run `consistency-lens dump` again."
            )
    shared = np.intersect1d(np.asarray(train.seq_index), np.asarray(val.seq_index))
    if shared.size:
        raise LensError(
            f"The train split '{train.path}' and the val split '{val.path}' share {shared.size} "
            "corpus sequences, so validation would measure training data; delete both and run "
            "`consistency-lens dump` again."
        )


def check_matches(dataset: ActivationDataset, lens: ConsistencyLens) -> None:
    """Refuse a dump whose width, layer or model differs from the lens's (train and eval alike)."""
    meta, width = dataset.metadata, lens.d_model
    # An empty split (every sample filtered) has no sample to read a width from.
    stored = int(dataset.sample(0)[1].shape[-1]) if len(dataset) else dataset.d_model
    if dataset.d_model != width or stored != width:
        problem = (
            f"it holds activations of width {stored} but model '{lens.cfg.model}' has width {width}"
        )
    elif meta.get("layer") != lens.layer:
        problem = f"it was made at layer {meta.get('layer')} but the config says layer={lens.layer}"
    elif meta.get("fingerprint") != lens.loaded.fingerprint:
        problem = (
            f"it was made with model '{meta.get('model')}' ({meta.get('fingerprint')}), not "
            f"'{lens.cfg.model}' ({lens.loaded.fingerprint})"
        )
    else:
        return
    raise LensError(
        f"The dump at '{dataset.path}' does not match the lens: {problem}; dump again: a dump "
        "with the lens's model and layer (`consistency-lens dump` with this config) matches it."
    )
