"""Helpers of the viewer tests: two tiny random lenses saved as lens directories, and a headless
Chromium under Selenium."""

from __future__ import annotations

from pathlib import Path

import torch

from consistency_lens.config import LensConfig


def tiny_lenses(root: Path, model_dir: Path) -> tuple[LensConfig, list[Path]]:
    """Save two untrained layer-1 lenses on the tiny model (`alpha` writes 3 tokens, `beta` 2)."""
    from consistency_lens.models.lens import ConsistencyLens

    paths = []
    for name, t_text in (("alpha", 3), ("beta", 2)):
        torch.manual_seed(t_text)
        cfg = LensConfig(
            model=str(model_dir),
            device="cpu",
            model_dtype="float32",
            layer=1,
            train={"t_text": t_text, "prompt": "thought <embed> is"},
        )
        ConsistencyLens.build(cfg).save_pretrained(root / name)
        paths.append(root / name)
    return cfg, paths


HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
"""Chromium offline and headless: nothing looked up, nothing synced, no GPU, no sandbox (root)."""


def chromium(binary: str, driver: str, profile: Path, size: tuple[int, int]):
    """A headless Chromium under Selenium with a fresh profile and a window of `size` pixels."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look anything up
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        *HEADLESS_FLAGS,
        f"--window-size={size[0]},{size[1]}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))
