"""The one declaration of which settings define a lens's weights and a dump cannot drift."""

from __future__ import annotations

import json

from pydantic import BaseModel

from consistency_lens.config import (
    DUMP_KEYS,
    FREE_KEYS,
    FREE_SECTIONS,
    MODEL_KEYS,
    WEIGHT_KEYS,
    LensConfig,
    config_fields,
    dump_config,
    dump_settings,
    objective_sections,
    setting,
    weight_settings,
)
from consistency_lens.data.layout import _HEADER_NAMES, RESUME_KEYS
from consistency_lens.training.checkpoint.manifest import CONFIG
from consistency_lens.training.checkpoint.resume import check_resume_config


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf setting of a config class by dotted name, descending into its sections (the
    objectives' own sections of `train` included)."""
    names = []
    for name, kind in config_fields(model).items():
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names += _fields(kind, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def _in_objective_section(key: str) -> bool:
    parts = key.split(".")
    return len(parts) > 2 and parts[0] == "train" and parts[1] in objective_sections()


def test_every_setting_is_declared_weight_dump_or_free():
    declared = set(WEIGHT_KEYS) | set(DUMP_KEYS)
    undeclared = [
        key
        for key in _fields(LensConfig)
        if key not in declared
        and key not in FREE_KEYS
        and key.split(".")[0] not in FREE_SECTIONS
        and not _in_objective_section(key)
    ]
    assert undeclared == [], (
        f"{undeclared} are not declared: add each to WEIGHT_KEYS or DUMP_KEYS in "
        "consistency_lens/config.py if changing it changes a lens's weights or a dump, else to "
        "FREE_KEYS"
    )


def test_declared_names_exist_and_free_is_disjoint():
    fields = set(_fields(LensConfig))
    named = [*WEIGHT_KEYS, *DUMP_KEYS, *FREE_KEYS]
    assert [key for key in named if key not in fields] == []
    assert [s for s in FREE_SECTIONS if s not in LensConfig.model_fields] == []
    assert set(FREE_KEYS) & (set(WEIGHT_KEYS) | set(DUMP_KEYS)) == set()
    assert [k for k in FREE_KEYS if k.split(".")[0] in FREE_SECTIONS] == []
    # An objective's own section is free as a whole: no list names a key inside one.
    assert [k for k in named if _in_objective_section(k)] == []
    assert "train.rl.samples" in fields and _in_objective_section("train.rl.samples")
    assert len(set(named)) == len(WEIGHT_KEYS) + len(DUMP_KEYS) + len(FREE_KEYS) - len(
        set(WEIGHT_KEYS) & set(DUMP_KEYS)
    )
    assert set(MODEL_KEYS) <= set(WEIGHT_KEYS)


def test_the_dump_header_records_and_resumes_on_every_dump_setting():
    header_names = [_HEADER_NAMES.get(key, key) for key in DUMP_KEYS]
    assert [name for name in header_names if name not in RESUME_KEYS] == []
    assert set(_HEADER_NAMES) <= set(DUMP_KEYS)


def test_setting_reads_dotted_keys_and_defaults_what_an_old_config_lacks():
    data = dump_config(LensConfig(layer=3, train={"inject_layer": 2, "t_text": 4}))
    assert setting(data, "layer") == 3
    assert setting(data, "train.inject_layer") == 2
    del data["train"]["inject_layer"]
    assert setting(data, "train.inject_layer") is None
    assert weight_settings(data)["train.t_text"] == 4
    assert list(weight_settings(data)) == list(WEIGHT_KEYS)


def test_predict_tokens_moved_beside_its_objective_and_stays_free(tmp_path):
    """train.warm_start.predict_tokens is now warm_start_predict's train.predict.tokens: like the
    old key (in FREE_KEYS) it is free, as its objective's section is, and a checkpoint saved
    with the old key resumes under a config with the new one, with any value of it."""
    assert "train.predict.tokens" in _fields(LensConfig)
    assert _in_objective_section("train.predict.tokens")
    assert "train.warm_start.predict_tokens" not in _fields(LensConfig)
    assert not [k for k in (*WEIGHT_KEYS, *DUMP_KEYS, *FREE_KEYS) if "predict" in k]
    saved = dump_config(LensConfig(train={"predict": {"tokens": 3}}))
    del saved["train"]["predict"]
    saved["train"]["warm_start"]["predict_tokens"] = 3
    assert setting(saved, "train.predict.tokens") == 3
    (tmp_path / CONFIG).write_text(json.dumps(saved))
    for tokens in (3, 4):
        ours = LensConfig(train={"predict": {"tokens": tokens}})
        assert weight_settings(saved) == weight_settings(dump_config(ours))
        check_resume_config(ours, tmp_path)  # not a mismatch: the setting is free


def test_dump_settings_reads_a_dump_config_of_another_version():
    """What a dump's recorded config says of its samples, whatever keys it has beside them."""
    cfg = LensConfig(seed=7, corpus="pydoc", val_samples=64, layer=3)
    saved = dump_config(cfg)
    saved["added_later"] = 1
    saved["decode"]["added_later"] = 1
    saved["train"]["steps"] = 99
    read = dump_settings(saved)
    top_dump = [key for key in DUMP_KEYS if "." not in key]
    assert {k: getattr(read, k) for k in top_dump} == {k: getattr(cfg, k) for k in top_dump}
    assert read.train == LensConfig().train  # sections are not read
