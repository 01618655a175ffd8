"""`consistency-lens dump`: activations A at block L, position P, stored once in safetensors shards.

Every sample's sequence and position are fixed up front by the seed, and shards are written
atomically in order, so a killed dump rerun with the same config ends with exactly the samples an
uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from consistency_lens.config import LensConfig, dump_config
from consistency_lens.data.corpus import (
    MIX_SEP,
    SOTU,
    TokenizedCorpus,
    corpus_parts,
    tokenized_corpus,
)
from consistency_lens.data.layout import (
    METADATA,
    PREDICTED,
    PROGRESS,
    RESUME_KEYS,
    SPLITS,
    prediction_header,
    split_dir,
    split_header,
    stored_prediction,
)
from consistency_lens.errors import LensError
from consistency_lens.models.adapter import check_layer
from consistency_lens.models.hooks import run_until
from consistency_lens.models.inputs import left_pad
from consistency_lens.models.loading import LoadedModel, load_for_config, max_positions
from consistency_lens.models.orig import OriginalModelWrapper
from consistency_lens.utils.dist import join_process_group
from consistency_lens.utils.io import (
    atomic_write,
    atomic_write_json,
    read_json,
    remove_stray_temps,
    sha256_file,
)
from consistency_lens.utils.lock import LOCK_FILE, dir_lock

_FP16_MAX = 65504.0
_HEADER_DEFAULTS = {"positions_per_sequence": 1}


@dataclass
class SplitPlan:
    """Which samples a split holds: each one's sequence and the position P drawn in it."""

    sequences: list[np.ndarray]
    """Token ids of each sample's sequence (BOS included when the tokenizer adds one)."""
    positions: np.ndarray
    """P per sample, uniform in `p_min <= P <= len - 2` (distinct within a sequence)."""
    seq_index: np.ndarray
    """Global index of each sample's sequence in the corpus, for A' pairing across splits."""


def _windows(
    corpus: TokenizedCorpus, body: int, min_len: int, bos: list[int]
) -> tuple[list[np.ndarray], int]:
    windows, skipped = [], 0
    for doc in corpus.documents():
        for start in range(0, len(doc), body):
            piece = doc[start : start + body]
            if len(piece) + len(bos) < min_len:
                skipped += 1
                continue
            windows.append(piece)
    return windows, skipped


def plan_splits(
    cfg: LensConfig,
    corpus: TokenizedCorpus | list[TokenizedCorpus],
    bos_id: int | None,
    splits: tuple[str, ...] = SPLITS,
) -> tuple[dict[str, SplitPlan], int]:
    """Cut the corpus into sequences, shuffle with the seed, and draw P for each sample.

    The val split is the permutation's first `val_samples` sequences whatever `num_samples` is,
    so a val-only plan (eval on another corpus) needs only that many; its train plan is then cut
    to what the corpus holds and must not be written. A list of corpora is a mixture (`a+b`):
    see `_choose`. With `positions_per_sequence` K > 1 each training sequence gives up to K
    samples at distinct positions (val keeps one per sequence).
    """
    bos = [bos_id] if bos_id is not None else []
    p_min = cfg.p_min_effective
    parts = corpus_parts(cfg.corpus)
    corpora = corpus if isinstance(corpus, list) else [corpus]
    if len(corpora) != len(parts):
        raise AssertionError(
            f"{len(corpora)} tokenized corpora for the {len(parts)} of {cfg.corpus}"
        )
    cut = [_windows(c, cfg.seq_len - len(bos), p_min + 2, bos) for c in corpora]
    skipped = sum(n for _, n in cut)
    windows, chosen = _choose(cfg, parts, [w for w, _ in cut], len(bos), splits)
    plans = {}
    for code, split in enumerate(SPLITS):
        rng = np.random.default_rng([cfg.seed, code])
        seqs = [
            np.concatenate([np.asarray(bos, np.int64), windows[i].astype(np.int64)])
            for i in chosen[split]
        ]
        highs = np.asarray([len(s) - 2 for s in seqs], np.int64)
        if split == "train" and cfg.positions_per_sequence > 1:
            positions = _distinct_positions(rng, chosen[split], highs, p_min)
        else:
            positions = rng.integers(p_min, highs + 1) if seqs else np.zeros(0, np.int64)
        plans[split] = SplitPlan(seqs, positions.astype(np.int64), chosen[split].astype(np.int64))
    # Disjoint by construction (two slices of one permutation); checked, since a leak is silent.
    if np.intersect1d(plans["train"].seq_index, plans["val"].seq_index).size:
        raise AssertionError("train and val splits share sequences")
    return plans, skipped


def _distinct_positions(
    rng: np.random.Generator, seq_index: np.ndarray, highs: np.ndarray, p_min: int
) -> np.ndarray:
    """P for each sample, distinct among the samples of one sequence (`p_min <= P <= high`)."""
    positions = np.zeros(len(seq_index), np.int64)
    order = np.argsort(seq_index, kind="stable")
    _, starts, counts = np.unique(seq_index[order], return_index=True, return_counts=True)
    for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + count]
        span = int(highs[rows[0]]) - p_min + 1
        positions[rows] = p_min + rng.choice(span, size=count, replace=False)
    return positions


def _order(
    cfg: LensConfig,
    name: str,
    usable: np.ndarray,
    train: int,
    splits: tuple[str, ...],
    mixed: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The seeded permutation of a corpus's sequences, and how many training samples each of
    the ones after the first `val_samples` gives (up to `positions_per_sequence`, of the
    `usable` positions each has; the last cut so they give `train` in all: all of `num_samples`,
    or a mixture part's share), after checking the corpus holds enough for `splits`."""
    p_min, count, per = cfg.p_min_effective, len(usable), cfg.positions_per_sequence
    if not count:
        raise LensError(
            f"Corpus '{name}' has no text long enough for positions {p_min}..seq_len-2 "
            f"(each sequence needs at least {p_min + 2} tokens); lower p_min or use longer texts."
        )
    order = np.random.default_rng(cfg.seed).permutation(count)
    rest = usable[order[cfg.val_samples :]]  # the sequences train may draw from, in order
    gives = np.minimum(rest, per)
    total = np.cumsum(gives)
    have = int(total[-1]) if len(total) else 0
    if per > 1 and "train" in splits and count >= cfg.val_samples and have < train:
        share = f"its share of num_samples ({train})" if mixed else f"num_samples ({train})"
        # More positions per sequence help only where a sequence has positions left.
        more = (rest > per).any()
        fix = "lower num_samples, raise positions_per_sequence" if more else "lower num_samples"
        raise LensError(
            f"Corpus '{name}' gives {have} training samples at positions_per_sequence={per} "
            f"after its {cfg.val_samples} val sequences, fewer than {share}; {fix} or use a "
            "bigger corpus."
        )
    if "train" in splits and per == 1:
        share = f"its share of num_samples ({train})" if mixed else "num_samples"
        wanted = cfg.val_samples + train
        short, what = count < wanted, f"{share} + val_samples = {wanted}; lower them"
    else:
        short, what = count < cfg.val_samples, f"val_samples = {cfg.val_samples}; lower it"
    if short:
        raise LensError(
            f"Corpus '{name}' yields {count} usable sequences of up to {cfg.seq_len} tokens, "
            f"fewer than {what} or use a bigger corpus."
        )
    # A val-only plan's train samples are cut to what the corpus holds (never written).
    taken = min(int(np.searchsorted(total, train)) + 1, len(total)) if train else 0
    gives = gives[:taken].copy()
    if taken:
        gives[-1] -= max(int(total[taken - 1]) - train, 0)
    return order, gives


def _choose(
    cfg: LensConfig,
    parts: list[str],
    cut: list[list[np.ndarray]],
    bos: int,
    splits: tuple[str, ...],
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The sequences of the corpus's parts, concatenated, and which of them each split's samples
    come from (a training sequence once per position drawn from it).

    Each part gives an equal share of `num_samples` and of `val_samples` (the first parts one
    more when they do not divide), so a single corpus gives them all. Every part is permuted
    exactly as a dump of that part alone is, and its train share comes from after the first
    `val_samples` of its permutation: the val split that `eval corpus=<part>` reads is never
    trained on, when eval has the same seed, seq_len and p_min and no more val_samples; `pydoc`
    and dataset parts are read only up to a cap set by num_samples + val_samples
    (`_shared_corpus`), so for them eval must also have the same num_samples and val_samples. A
    mixture's splits are then shuffled, so that any prefix of them (training's validation
    batches) holds every part; so is a train split of several positions per sequence, so that
    a sequence's samples are spread over the epoch.
    """
    windows: list[np.ndarray] = []
    chosen: dict[str, list[int]] = {"val": [], "train": []}
    k, p_min = len(parts), cfg.p_min_effective
    single = 0  # the train split's length at one position per sequence
    for j, (part, part_windows) in enumerate(zip(parts, cut, strict=True)):
        val_share = cfg.val_samples // k + (j < cfg.val_samples % k)
        train_share = cfg.num_samples // k + (j < cfg.num_samples % k)
        # Positions p_min..len-2 of each sequence (BOS included).
        usable = np.asarray([len(w) + bos - 1 - p_min for w in part_windows], np.int64)
        order, gives = _order(cfg, part, usable, train_share, splits, k > 1)
        single += min(train_share, max(len(part_windows) - cfg.val_samples, 0))
        order = order + len(windows)
        chosen["val"] += order[:val_share].tolist()
        start = cfg.val_samples
        chosen["train"] += np.repeat(order[start : start + len(gives)], gives).tolist()
        windows += part_windows
    picked = {split: np.asarray(chosen[split], np.int64) for split in SPLITS}
    if k > 1 or cfg.positions_per_sequence > 1:
        picked["train"] = np.random.default_rng([cfg.seed, len(SPLITS)]).permutation(
            picked["train"]
        )
    if k > 1:
        # Val's generator first draws what one position per sequence gives train (a val-only
        # plan's train is cut to what the corpus holds, which depends on positions_per_sequence),
        # so val is the same split for every value and every split asked for.
        rng = np.random.default_rng([cfg.seed, len(SPLITS)])
        rng.permutation(single)
        picked["val"] = rng.permutation(picked["val"])
    return windows, picked


def _cap(cfg: LensConfig, part: str) -> int | None:
    """The tokens a part is read up to: `pydoc` and Hub datasets are streamed up to a cap set by
    num_samples + val_samples (their sequences then depend on it); `sotu` and local files whole."""
    if part == SOTU or Path(part).exists():
        return None
    return 2 * (cfg.num_samples + cfg.val_samples) * cfg.seq_len


def may_train_on_val(trained: LensConfig, cfg: LensConfig) -> str | None:
    """Why a dump made with the config `trained` (a lens's) may hold in its train split val
    samples of a dump made with `cfg`, or None when `_choose` keeps them out.

    Only the lens's last training stage is checked: a lens started from another
    (`train.init_from`) also trained on that one's dumps, which its config does not name.
    """
    shared = [
        part
        for part in corpus_parts(cfg.corpus)
        if part in corpus_parts(trained.corpus)
        # Another split or text column of a Hub dataset is other text.
        and (
            _cap(cfg, part) is None
            or (trained.corpus_split, trained.text_column) == (cfg.corpus_split, cfg.text_column)
        )
    ]
    if not shared:
        return None
    where = MIX_SEP.join(shared)
    differ = [
        k for k in ("model", "seed", "seq_len", "p_min") if getattr(trained, k) != getattr(cfg, k)
    ]
    if differ:
        return f"it trained on {where} with another {', '.join(differ)}"
    if any(_cap(trained, part) != _cap(cfg, part) for part in shared):
        return f"it trained on {where} cut at another length (num_samples + val_samples)"
    if trained.val_samples < cfg.val_samples:
        return (
            f"it held out {trained.val_samples} val samples of {where}, "
            f"fewer than the {cfg.val_samples} read here"
        )
    return None


def plan_digest(plan: SplitPlan) -> str:
    """sha256 of a split's sequences, positions and corpus indices: the samples it decides."""
    digest = hashlib.sha256()
    digest.update(plan.positions.astype("<i8").tobytes())
    digest.update(plan.seq_index.astype("<i8").tobytes())
    for seq in plan.sequences:
        digest.update(len(seq).to_bytes(8, "little"))
        digest.update(np.asarray(seq).astype("<i8").tobytes())
    return digest.hexdigest()


def _bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one by itself, so dumped contexts match ordinary use."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos if bos is not None and ids and ids[0] == bos else None


def _forward_batch(
    loaded: LoadedModel, layer: int, seqs: list[np.ndarray], positions: np.ndarray
) -> torch.Tensor:
    """Activations at each row's P; only blocks 0..L run. Right padding is inert in a causal model."""
    width = int(positions.max()) + 1
    pad = loaded.pad_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    for row, seq in enumerate(seqs):
        take = min(len(seq), width)
        ids[row, :take] = torch.from_numpy(seq[:take])
    device = loaded.parts.embed.weight.device  # with device_map the blocks may live elsewhere
    with torch.inference_mode():
        hidden = run_until(
            loaded.model, loaded.parts.blocks[layer], input_ids=ids.to(device), use_cache=False
        )
    rows = torch.arange(len(seqs), device=hidden.device)  # block L may sit on another GPU
    return hidden[rows, torch.as_tensor(positions, device=hidden.device)].float().cpu()


@dataclass
class _Prediction:
    """How the dump computes M's continuation after P (the header's `predicted`)."""

    orig: OriginalModelWrapper
    tokens: int
    pick: Callable[[torch.Tensor], torch.Tensor] | None


def _forward_predicting(
    predict: _Prediction, seqs: list[np.ndarray], positions: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations at each row's P and M's continuation after it (int32), from one pass of all
    blocks over the contexts 0..P, left-padded as a collated batch is."""
    orig = predict.orig
    contexts = [torch.from_numpy(seq[: int(p) + 1]) for seq, p in zip(seqs, positions, strict=True)]
    ids, mask = left_pad(contexts, orig.loaded.pad_id)
    with torch.inference_mode():
        tokens, acts = orig.continuation_and_activations(
            ids.to(orig.device), mask.to(orig.device), predict.tokens, predict.pick
        )
    return acts.float().cpu(), tokens.to(torch.int32).cpu()


def _prediction(
    stored: dict, orig: OriginalModelWrapper, directory: Path, finished: bool
) -> _Prediction:
    """How to compute the rest of a split whose header has `stored` as its `predicted` (this
    config's, or kept from the dump's start by `_resume_state`)."""
    if not finished and prediction_header(stored["tokens"], stored["first"], orig) != stored:
        # Its shards so far picked M's first token by another content-word rule (older code).
        raise LensError(
            f"'{directory}' holds shards of M's continuation whose first token another version's "
            "content-word rule picked; delete that directory or use another output_dir."
        )
    return _Prediction(orig, stored["tokens"], orig.first_pick(stored["first"]))


def _check_values(acts: torch.Tensor, cfg: LensConfig) -> None:
    if not torch.isfinite(acts).all():
        raise LensError(
            f"The model produced NaN/inf activations at layer {cfg.layer}; try model_dtype=float32."
        )
    peak = float(acts.abs().max())
    if cfg.dtype == "float16" and peak > _FP16_MAX:
        raise LensError(
            f"Activations at layer {cfg.layer} reach {peak:.3g}, beyond float16's range; "
            "rerun with dtype=bfloat16 or dtype=float32."
        )


def _keep_mask(acts: torch.Tensor, ratio: float | None) -> torch.Tensor:
    if ratio is None:
        return torch.ones(len(acts), dtype=torch.bool)
    norms = acts.norm(dim=-1)
    return norms <= ratio * norms.median()


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return sha256_file(path)


def _shard_tensors(
    plan: SplitPlan,
    idx: np.ndarray,
    acts: torch.Tensor,
    keep: torch.Tensor,
    dtype: torch.dtype,
    next_tokens: int,
    predicted: torch.Tensor | None,
) -> dict:
    kept = idx[keep.numpy()]
    # Only where the header has `predicted`: other shards are byte for byte what they were.
    extra = {} if predicted is None else {"predicted_ids": predicted[keep].contiguous()}
    ctx = [plan.sequences[i][: plan.positions[i] + 1] for i in kept]
    lengths = np.asarray([len(c) for c in ctx], np.int64)
    # The corpus tokens after P (fewer at the end of a sequence, at least one since P <= len-2).
    after = [plan.sequences[i][plan.positions[i] + 1 :][:next_tokens] for i in kept]
    after_lengths = np.asarray([len(c) for c in after], np.int64)
    return {
        "input_ids_next": torch.from_numpy(
            np.concatenate(after).astype(np.int32) if after else np.zeros(0, np.int32)
        ),
        "next_offsets": torch.from_numpy(
            np.concatenate([[0], np.cumsum(after_lengths)]).astype(np.int64)
        ),
        "A": acts[keep].to(dtype).contiguous(),
        "input_ids": torch.from_numpy(
            np.concatenate(ctx).astype(np.int32) if ctx else np.zeros(0, np.int32)
        ),
        "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
        "positions": torch.from_numpy(plan.positions[kept].copy()),
        "seq_index": torch.from_numpy(plan.seq_index[kept].copy()),
        **extra,
    }


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[rate]:.1f} samples/s"),
        TimeRemainingColumn(),
        disable=os.environ.get("CI") == "true",
    )


def _join(cfg: LensConfig) -> tuple[int, int, LensConfig]:
    """Under torchrun: join the process group with this rank's device; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, cfg
    if cfg.device_map is not None:
        raise LensError(
            "device_map spreads one model over the node's GPUs in one process; "
            "launch the dump without torchrun, or drop device_map for one model per rank."
        )
    cfg = cfg.model_copy(update={"device": join_process_group(cfg.device)})
    return torch.distributed.get_rank(), world, cfg


def _resume_state(directory: Path, header: dict) -> tuple[dict, list[dict]]:
    """The header to write under and the valid shards already written by an earlier run of the
    same dump, in order; reads only.

    Refuses (before anything is written) a directory dumped with any other setting that decides
    the samples, so a rerun never mixes shards of two corpora, seeds or splits. A dump with shards
    whose stored continuation (`PREDICTED`, or none) differs from this config's keeps its own, so
    its shards agree: training then computes the continuation where it needs another one, and an
    existing dump stays usable as it is.
    """
    progress = directory / PROGRESS
    if not progress.is_file():
        if (directory / METADATA).is_file():
            # A complete dump without its progress file cannot be checked; never mix with it.
            raise LensError(
                f"'{directory}' holds a dump without its progress.json, so it cannot be checked "
                "against this config; delete that directory or use another output_dir."
            )
        return header, []
    state = read_json(progress, "Dump progress file")
    old = state.get("header")
    if not isinstance(old, dict) or not isinstance(state.get("shards"), list):
        raise LensError(
            f"Dump progress file '{progress}' is damaged; delete '{directory}' and dump again."
        )
    for key in RESUME_KEYS:
        # A dump made before a setting existed was made with its default.
        made = old.get(key, _HEADER_DEFAULTS.get(key))
        if made != header.get(key):
            if key == "plan_sha256":
                raise LensError(
                    f"'{directory}' holds a dump of other sequences (the corpus content changed "
                    "since it was made); delete that directory or use another output_dir."
                )
            raise LensError(
                f"'{directory}' holds a dump made with {key}={made!r}, not "
                f"{header.get(key)!r}; use another output_dir or delete that directory."
            )
    done = []
    for shard in state["shards"]:
        path = directory / shard["file"]
        if not path.is_file() or sha256_file(path) != shard["sha256"]:
            break
        done.append(shard)
    if done and old.get(PREDICTED) != header.get(PREDICTED):
        header = {key: value for key, value in header.items() if key != PREDICTED}
        if old.get(PREDICTED) is not None:
            header[PREDICTED] = old[PREDICTED]
    return header, done


def _grouped_activations(
    loaded: LoadedModel,
    cfg: LensConfig,
    plan: SplitPlan,
    idx: np.ndarray,
    progress: Progress,
    task: int,
    predict: _Prediction | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activations (len(idx), d) of samples `idx`, in that order, from forwards grouped by P, and
    with `predict` M's continuation after P (len(idx), k) from the same forwards (else None).

    P is uniform in p_min..len-2, so a batch in plan order runs almost to seq_len; sorted by P
    (stably, so the batches follow from the seed alone) each batch stops at its own largest P.
    The window is the shard, the unit of resume, so a resumed dump forms the same batches.
    """
    order = np.argsort(plan.positions[idx], kind="stable")
    out: torch.Tensor | None = None
    predicted = (
        None if predict is None else torch.zeros((len(idx), predict.tokens), dtype=torch.int32)
    )
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start : start + cfg.batch_size]
        batch = idx[rows]
        seqs = [plan.sequences[i] for i in batch]
        tic = progress.get_time()
        if predict is None:
            acts = _forward_batch(loaded, cfg.layer, seqs, plan.positions[batch])
        else:
            acts, tokens = _forward_predicting(predict, seqs, plan.positions[batch])
            predicted[torch.from_numpy(rows)] = tokens
        _check_values(acts, cfg)
        if out is None:
            out = acts.new_empty((len(idx), acts.shape[1]))
        out[torch.from_numpy(rows)] = acts
        progress.update(
            task, advance=len(batch), rate=len(batch) / max(progress.get_time() - tic, 1e-9)
        )
    return out, predicted


def _dump_rank(
    loaded: LoadedModel,
    cfg: LensConfig,
    plan: SplitPlan,
    span: range,
    directory: Path,
    header: dict,
    progress: Progress,
    label: str,
    shards: list[dict],
    predict: _Prediction | None,
) -> dict:
    # `shards`: the valid ones of an earlier run, from `_resume_state` (checked once, under the lock).
    shards = list(shards)
    # Temporary files of a killed run; only now, after the checks and under the lock.
    remove_stray_temps(directory)
    dtype = getattr(torch, cfg.dtype)
    n_shards = math.ceil(len(span) / cfg.shard_size)
    task = progress.add_task(label, total=len(span), rate=0.0)
    progress.update(task, completed=sum(s["count"] for s in shards))
    for number in range(len(shards), n_shards):
        idx = np.arange(
            span.start + number * cfg.shard_size,
            min(span.stop, span.start + (number + 1) * cfg.shard_size),
        )
        acts_t, predicted = _grouped_activations(loaded, cfg, plan, idx, progress, task, predict)
        # The filter's median is taken over the plan's own batches, as before grouping.
        keep_t = torch.cat(
            [
                _keep_mask(acts_t[start : start + cfg.batch_size], cfg.max_norm_ratio)
                for start in range(0, len(idx), cfg.batch_size)
            ]
        )
        name = f"shard_{number:05d}.safetensors"
        tensors = _shard_tensors(plan, idx, acts_t, keep_t, dtype, header["next_tokens"], predicted)
        digest = _write_shard(directory / name, tensors)
        shards.append(
            {"file": name, "count": int(len(idx)), "kept": int(keep_t.sum()), "sha256": digest}
        )
        atomic_write_json(directory / PROGRESS, {"header": header, "shards": shards})
    return {"shards": shards, "kept": sum(s["kept"] for s in shards), "drawn": len(span)}


def check_seq_len(cfg: LensConfig, loaded: LoadedModel) -> None:
    """Refuse a `seq_len` longer than the model's context, where positions past it are garbage."""
    limit = max_positions(loaded.model)
    if limit is not None and cfg.seq_len > limit:
        raise LensError(
            f"seq_len={cfg.seq_len} is longer than model '{cfg.model}' reads ({limit} positions), "
            f"so P could not reach seq_len-2; use seq_len <= {limit}."
        )


def dump_activations(
    cfg: LensConfig, loaded: LoadedModel | None = None, splits: tuple[str, ...] = SPLITS
) -> dict[str, Path]:
    """Dump the train and val splits (or only `splits`); returns split name -> split directory."""
    rank, world, cfg = _join(cfg)
    loaded = loaded or load_for_config(cfg)
    check_layer(loaded.parts, cfg.layer)
    check_seq_len(cfg, loaded)
    corpus = _shared_corpus(cfg, loaded, rank, world)
    plans, skipped = plan_splits(cfg, corpus, _bos_id(loaded.tokenizer), splits)
    # M's whole forward over each training context, for the continuation `warm_start_predict`
    # learns. Not over the val split: validation reads a few of its samples (cheaper live than a
    # third more of the whole split's dump), and the val split an eval dumps for another corpus,
    # or that earlier evals read, stays what it was, byte for byte.
    wanted = stored_prediction(cfg) if "train" in splits else None
    orig = None if wanted is None else OriginalModelWrapper(loaded, cfg.layer)
    predicted = None if wanted is None else prediction_header(*wanted, orig)
    out: dict[str, Path] = {}
    with contextlib.ExitStack() as locks, _progress() as progress:
        # Lock and check every split before writing anything: a refused val split must not
        # leave a rewritten train split behind.
        jobs, error = [], None
        try:
            where = (cfg.output_dir, cfg.model, cfg.layer, cfg.corpus)
            for split in splits:
                if not len(plans[split].sequences):
                    _refuse_stale_split(split_dir(*where, split), split)
            for split in splits:
                plan, directory = plans[split], split_dir(*where, split)
                rank_dir = directory / f"rank_{rank}" if world > 1 else directory
                if not len(plan.sequences):
                    continue
                header = split_header(
                    cfg,
                    loaded,
                    MIX_SEP.join(c.key for c in corpus),
                    split,
                    len(plan.sequences),
                    plan_digest(plan),
                    world,
                    predicted if split == "train" else None,
                )
                locks.enter_context(
                    dir_lock(rank_dir, "dump split", "use another output_dir for this dump")
                )
                header, done = _resume_state(rank_dir, header)
                per = math.ceil(len(plan.sequences) / world)
                span = range(rank * per, min(len(plan.sequences), (rank + 1) * per))
                if (
                    split == "train"
                    and predicted is not None
                    and header.get(PREDICTED) != predicted
                ):
                    progress.console.print(
                        f"'{rank_dir}' holds shards without M's continuation of this "
                        "train.predict and is resumed as it was; warm_start_predict computes it "
                        "at every step (dump into another output_dir to store it)."
                    )
                predict = None
                if PREDICTED in header:
                    orig = orig or OriginalModelWrapper(loaded, cfg.layer)
                    finished = sum(s["count"] for s in done) == len(span)
                    predict = _prediction(header[PREDICTED], orig, rank_dir, finished)
                jobs.append((split, plan, directory, rank_dir, header, done, span, predict))
        except LensError as err:
            error = str(err)
        if world > 1:
            # Every rank raises if one is refused, or the others would wait forever at a barrier.
            errors: list[str | None] = [None] * world
            torch.distributed.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise LensError(error)
        for split, plan, directory, rank_dir, header, done, span, predict in jobs:
            result = _dump_rank(
                loaded, cfg, plan, span, rank_dir, header, progress, f"dump {split}", done, predict
            )
            meta = {
                **header,
                "count": result["kept"],
                "drawn": result["drawn"],
                "filtered_high_norm": result["drawn"] - result["kept"],
                "skipped_short_sequences": skipped,
                "shards": result["shards"],
                "config": dump_config(cfg),
            }
            if world > 1:
                atomic_write_json(rank_dir / METADATA, meta)
                torch.distributed.barrier()
                if rank == 0:
                    _write_global(directory, header, world, skipped, cfg)
                torch.distributed.barrier()
            else:
                atomic_write_json(directory / METADATA, meta)
            out[split] = directory
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out


def _refuse_stale_split(directory: Path, split: str) -> None:
    """A split this config draws no samples for must not survive from another config."""
    if directory.is_dir() and any(p.name != LOCK_FILE for p in directory.iterdir()):
        raise LensError(
            f"'{directory}' holds a {split} split of an earlier dump, but this config draws no "
            f"{split} samples (e.g. val_samples=0); delete that directory or use another output_dir."
        )


def _write_global(directory: Path, header: dict, world: int, skipped: int, cfg: LensConfig) -> None:
    ranks = [read_json(directory / f"rank_{k}" / METADATA, "Rank metadata") for k in range(world)]
    atomic_write_json(
        directory / METADATA,
        {
            **header,
            "ranks": [f"rank_{k}" for k in range(world)],
            "count": sum(r["count"] for r in ranks),
            "drawn": sum(r["drawn"] for r in ranks),
            "filtered_high_norm": sum(r["filtered_high_norm"] for r in ranks),
            "skipped_short_sequences": skipped,
            "config": dump_config(cfg),
        },
    )


def _shared_corpus(
    cfg: LensConfig, loaded: LoadedModel, rank: int, world: int
) -> list[TokenizedCorpus]:
    """Each part of the corpus, tokenized; rank 0 tokenizes (or reuses the cache) first, the
    other ranks then read the cache."""

    def build() -> list[TokenizedCorpus]:
        corpora = []
        for part in corpus_parts(cfg.corpus):
            corpora.append(
                tokenized_corpus(
                    part,
                    loaded.tokenizer,
                    cfg.cache_dir,
                    cfg.text_column,
                    cfg.corpus_split,
                    max_tokens=_cap(cfg, part),
                )
            )
        return corpora

    corpora = build() if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
    return corpora if corpora is not None else build()
