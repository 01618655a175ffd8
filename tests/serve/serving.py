"""Helpers of the viewer tests: two tiny random lenses saved as lens directories, and a real
uvicorn server on a free 127.0.0.1 port that the test shuts down."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
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


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, port: int | None = None):
    """Serve `app` with uvicorn on 127.0.0.1 in a thread; yield its base URL; stop it after."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
