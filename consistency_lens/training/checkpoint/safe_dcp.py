"""Reading torch.distributed.checkpoint files without plain unpickling: `.metadata` goes through
an unpickler that admits an exact allow-list of classes, and every non-tensor item through
`torch.load(weights_only=True)`."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import BinaryIO

import torch

from consistency_lens.errors import LensError


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` admitting only the exact (module, name) pairs of `_DCP_GLOBALS`."""

    def find_class(self, module: str, name: str) -> object:
        # Exact pairs only: a prefix rule let protocol-4 dotted names (e.g. "os.system" looked up
        # inside a DCP module that imports os) resolve to arbitrary callables.
        if (module, name) not in _DCP_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}:{name} from checkpoint metadata"
            )
        return super().find_class(module, name)


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = frozenset(
    {
        # DCP's metadata dataclasses and enum (what `Metadata` and its values are made of).
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        # Plain value types the dataclasses hold.
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # name -> torch.layout lookup, nothing else
        ("pathlib", "PosixPath"),  # the checkpoint id DCP records; constructing a path runs nothing
        ("pathlib._local", "PosixPath"),  # the same class on Python >= 3.13
        # torch's dtype objects by their exact names (torch.float32, torch.bfloat16, ...).
        *(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)),
    }
)


def _read_dcp_metadata(handle: BinaryIO, path: Path) -> object:
    try:
        return _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as err:
        raise LensError(f"Checkpoint '{path}' has unsafe or corrupt metadata ({err}).") from None


def _safe_reader(path: Path) -> object:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as handle:
                metadata = _read_dcp_metadata(handle, path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner() -> object:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(
            self, read_item, value
        ):  # non-tensor items: weights_only, never plain pickle
            item = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
            else:
                self.state_dict[read_item.dest_index.fqn] = item

    return SafePlanner()


def dcp_load(target: dict, path: Path) -> None:
    """`torch.distributed.checkpoint.load` without plain unpickling of metadata or extra items."""
    import torch.distributed.checkpoint as dcp

    with open(Path(path) / ".metadata", "rb") as handle:  # fail here with one sentence, not in DCP
        _read_dcp_metadata(handle, Path(path))
    dcp.load(target, storage_reader=_safe_reader(path), planner=_safe_planner())
