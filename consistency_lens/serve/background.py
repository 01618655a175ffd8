"""The viewer served from a background thread of the current process (a notebook, a benchmark,
a test): uvicorn on 127.0.0.1, a port the system picks, stopped when the block ends."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def running(app, port: int = 0, start_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 in a daemon thread; yield its base URL; stop it after.

    Port 0 lets the system pick a free port at bind time, so two servers never race for one."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lens-viewer", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"the viewer did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{bound}"
    finally:
        server.should_exit = True
        thread.join(start_timeout)
