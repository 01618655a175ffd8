"""`ActivationDataset`: memory-mapped dump shards, with A' paired at load time by a seeded generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from consistency_lens.data.layout import FORMAT_VERSION, METADATA, PREDICTED
from consistency_lens.errors import LensError
from consistency_lens.utils.io import read_json, sha256_file


class _Shard:
    """One shard opened by memory map; contexts are sliced from a flat id array by offsets."""

    def __init__(self, path: Path):
        try:
            self.handle = safe_open(str(path), framework="pt")
            self.offsets = self.handle.get_tensor("offsets")
            self.seq_index = self.handle.get_tensor("seq_index")
        except (SafetensorError, OSError) as err:
            raise LensError(
                f"Shard '{path}' cannot be read ({err}); re-run the dump to rewrite it."
            ) from None
        self.acts = self.handle.get_slice("A")
        self.ids = self.handle.get_slice("input_ids")
        self.next_offsets = self.handle.get_tensor("next_offsets")
        self.next_ids = self.handle.get_slice("input_ids_next")
        # (n, k) M's continuation after P, in a dump of a config that runs warm_start_predict.
        stored = "predicted_ids" in self.handle.keys()
        self.predicted = self.handle.get_tensor("predicted_ids") if stored else None

    def __len__(self) -> int:
        return len(self.seq_index)

    def context(self, i: int) -> torch.Tensor:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[start:end].long()

    def next_tokens(self, i: int) -> torch.Tensor:
        start, end = int(self.next_offsets[i]), int(self.next_offsets[i + 1])
        return self.next_ids[start:end].long()

    def activation(self, i: int) -> torch.Tensor:
        return self.acts[i : i + 1][0]


def _shard_dirs(path: Path, meta: dict) -> list[Path]:
    return [path / rank for rank in meta["ranks"]] if "ranks" in meta else [path]


class ActivationDataset(Dataset):
    """Samples of one dump split; `ds[i]` has input_ids_A, A, input_ids_A_prime, A_prime,
    input_ids_next and, once `read_predictions` says so, predicted_ids."""

    def __init__(self, path: Path | str, seed: int = 0, verify: bool = True):
        self.path = Path(path)
        if not (self.path / METADATA).is_file():
            raise LensError(
                f"No activation dump at '{self.path}' (metadata.json missing); "
                "run `consistency-lens dump` with the same config first."
            )
        self.metadata = read_json(self.path / "metadata.json", "Dump metadata")
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise LensError(
                f"Dump '{self.path}' has format version {self.metadata.get('format_version')} but "
                f"this version reads {FORMAT_VERSION} (which also stores the tokens after P, "
                "`input_ids_next`); delete that directory and run `consistency-lens dump` again."
            )
        self.shards: list[_Shard] = []
        predicted = []  # each shard directory's header of its stored continuation
        for directory in _shard_dirs(self.path, self.metadata):
            meta = (
                self.metadata
                if directory == self.path
                else read_json(directory / METADATA, "Rank metadata")
            )
            predicted.append(meta.get(PREDICTED))
            for entry in meta["shards"]:
                shard_path = directory / entry["file"]
                if not shard_path.is_file():
                    raise LensError(
                        f"Shard '{shard_path}' is missing; re-run the dump to rewrite it."
                    )
                if verify and sha256_file(shard_path) != entry["sha256"]:
                    raise LensError(
                        f"Shard '{shard_path}' is corrupt (checksum mismatch); delete it and re-run the dump."
                    )
                self.shards.append(_Shard(shard_path))
        sizes = np.asarray([len(s) for s in self.shards], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.seq_index = np.concatenate([s.seq_index.numpy() for s in self.shards])
        if np.unique(self.seq_index).size < 2:
            raise LensError(
                f"Dump '{self.path}' holds samples of fewer than 2 sequences; A' needs another "
                "sequence."
            )
        every = all(shard.predicted is not None for shard in self.shards)
        self.predicted: dict | None = (
            predicted[0] if every and all(p == predicted[0] for p in predicted) else None
        )
        """The header (`layout.prediction_header`) of M's continuation every shard stores, or None."""
        self.reads_predictions = False
        """Whether items carry `predicted_ids` (`read_predictions`)."""
        self.seed = seed
        self.set_epoch(0)

    @property
    def d_model(self) -> int:
        """Width of the stored activations."""
        return int(self.metadata["d_model"])

    def mean_activation(self) -> torch.Tensor:
        """Per-feature mean of A over the whole split, read shard by shard (float32)."""
        total = torch.zeros(self.d_model, dtype=torch.float64)
        for shard in self.shards:
            total += shard.handle.get_tensor("A").double().sum(0)
        return (total / len(self)).float()

    def set_epoch(self, epoch: int) -> None:
        """Re-pair every sample with an A' from a different sequence, seeded by (seed, epoch)."""
        n = len(self)
        rng = np.random.default_rng([self.seed, epoch])
        # An offset in 1..n-1 never pairs a sample with itself; a dump of several positions per
        # sequence redraws the partners from the same sequence (with one, there are none).
        partner = (np.arange(n) + 1 + rng.integers(0, n - 1, size=n)) % n
        same = np.flatnonzero(self.seq_index[partner] == self.seq_index)
        while same.size:
            partner[same] = (same + 1 + rng.integers(0, n - 1, size=same.size)) % n
            same = same[self.seq_index[partner[same]] == self.seq_index[same]]
        self.partner = partner

    def read_predictions(self, wanted: dict | None) -> None:
        """Give items M's stored continuation (`predicted_ids`) from now on when it is `wanted`
        (an objective's `stored_predictions`), else none."""
        self.reads_predictions = wanted is not None and self.predicted == wanted

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.shards[shard], i - int(self._starts[shard])

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids_A, A) of sample i, A as float32."""
        shard, j = self._locate(i)
        return shard.context(j), shard.activation(j).float()

    def next_tokens(self, i: int) -> torch.Tensor:
        """The corpus tokens right after P of sample i (up to the dump's `next_tokens`)."""
        shard, j = self._locate(i)
        return shard.next_tokens(j)

    def predicted_ids(self, i: int) -> torch.Tensor:
        """M's stored continuation after P of sample i (k,), as `predicted` says (a dump that
        stores one)."""
        shard, j = self._locate(i)
        return shard.predicted[j].long()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, act = self.sample(i)
        ids_p, act_p = self.sample(int(self.partner[i]))
        item = {
            "input_ids_A": ids,
            "A": act,
            "input_ids_A_prime": ids_p,
            "A_prime": act_p,
            "input_ids_next": self.next_tokens(i),
        }
        if self.reads_predictions:
            item["predicted_ids"] = self.predicted_ids(i)
        return item
