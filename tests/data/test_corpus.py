"""Corpus sources: local .txt/.jsonl, HF datasets (streamed and capped), and the token cache."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import make_text
from transformers import AutoTokenizer

from consistency_lens.data.corpus import iter_documents, tokenized_corpus
from consistency_lens.errors import LensError


def test_hf_dataset_is_streamed_capped_and_cached(tmp_path, tokenizer_dir, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    calls = []
    pulled = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))

        def stream():
            for i in range(1000):
                pulled.append(i)
                yield {"content": make_text(i, 50)}

        return stream()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = tokenized_corpus("org/stories", tok, tmp_path, text_column="content", max_tokens=2000)
    assert calls == [("org/stories", "train", True)]
    assert (
        2000 <= corpus.num_tokens < 2000 + 64 * 200
    )  # stops within one tokenizer batch of the cap
    assert len(pulled) < 1000
    again = tokenized_corpus("org/stories", tok, tmp_path, text_column="content", max_tokens=2000)
    assert len(calls) == 1 and again.num_tokens == corpus.num_tokens  # reused from the cache
    first = next(corpus.documents())
    assert tok.decode(first.tolist()) == make_text(0, 50)
    with pytest.raises(LensError, match="no column 'text'"):
        list(iter_documents("org/stories", "text"))


def test_jsonl_and_txt_directory(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha text")
    (folder / "b.jsonl").write_text(
        json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n"
    )
    assert list(iter_documents(str(folder))) == ["alpha text", "beta", "gamma"]
    (folder / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(LensError, match="has no 'text' field"):
        list(iter_documents(str(folder)))


def test_editing_a_local_corpus_rebuilds_its_cache(tmp_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(make_text(1, 40))
    before = tokenized_corpus(str(folder), tok, tmp_path / "cache")
    (folder / "b.txt").write_text(make_text(2, 40))
    after = tokenized_corpus(str(folder), tok, tmp_path / "cache")
    assert after.key != before.key and after.num_tokens > before.num_tokens
    assert tokenized_corpus(str(folder), tok, tmp_path / "cache").key == after.key


def test_pydoc_corpus_is_the_stdlib_docstrings_read_without_importing():
    """The built-in second genre: module by module, docstrings only, no module ever imported."""
    import sys

    from consistency_lens.data.corpus import _local_stamp, corpus_slug, iter_documents

    assert "antigravity" not in sys.modules and "this" not in sys.modules
    docs = list(iter_documents("pydoc"))
    assert len(docs) > 200 and all(isinstance(d, str) and len(d) >= 300 for d in docs)
    assert any("Abstract Base Classes" in d for d in docs[:20])  # abc.py, parsed by ast
    assert not any("def setUp(self)" in d for d in docs)  # test packages are skipped
    # Importing `this` prints the Zen of Python, `antigravity` opens a browser: neither ran.
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    assert corpus_slug("pydoc") == "pydoc"
    assert _local_stamp("pydoc") == f"-py{sys.version_info.major}{sys.version_info.minor}"
