"""The viewer's ASGI app (FastAPI): lenses loaded once at start and chosen by name, every request
run by one model worker thread in arrival order, the page's assets held in memory.

No request names a path: lenses are looked up by name among those loaded at start, and the page's
three assets are read from the package when the app is built, so no request reads or writes a file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from consistency_lens.errors import LensError

ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
"""The page and its assets (package data under `consistency_lens/serve/static`)."""

TOP_K = 5
"""Next tokens shown for M and for the reconstruction."""


@dataclass
class Limits:
    """What one request may ask of the worker."""

    max_chars: int = 4000
    """Longest text, in characters (checked before tokenizing)."""
    max_tokens: int = 512
    """Longest text, in tokens."""
    max_queue: int = 64
    """Requests waiting for the worker beyond which new ones get a 503."""
    max_samples: int = 8
    """Sampled explanations one request may ask for."""


class ExplainRequest(BaseModel):
    """Body of POST /api/explain."""

    model_config = ConfigDict(extra="forbid")
    text: str
    lens: str | None = None


class SamplesRequest(BaseModel):
    """Body of POST /api/samples."""

    model_config = ConfigDict(extra="forbid")
    text: str
    position: int
    lens: str | None = None
    num: int = Field(3, ge=1)
    seed: int = Field(0, ge=0)


class HTTPProblem(Exception):
    """A request the server refuses: an HTTP status and one sentence naming the problem and fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Worker:
    """One thread owns the models: jobs run one at a time in arrival order, never concurrently on
    the same weights. A job whose client left before its turn is cancelled and never runs."""

    max_queue: int
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    pending: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    ran: int = 0
    dropped: int = 0

    def _run(self, fn, *args):
        with self._lock:
            self.pending -= 1
            self.ran += 1
        return fn(*args)

    async def submit(self, request: Request, fn, *args) -> Any:
        """Run `fn(*args)` on the worker; give up (and drop the job if not started) when the
        client disconnects."""
        with self._lock:
            if self.pending >= self.max_queue:
                raise HTTPProblem(
                    503,
                    f"The server already has {self.pending} requests waiting; retry in a moment.",
                )
            self.pending += 1
            if self.pool is None:
                self.pool = concurrent.futures.ThreadPoolExecutor(1, "lens-worker")
            future = self.pool.submit(self._run, fn, *args)
        waiting = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.05)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                if future.cancel():
                    with self._lock:
                        self.pending -= 1
                        self.dropped += 1
                raise HTTPProblem(499, "The client closed the connection.")

    def close(self) -> None:
        """Stop the worker thread after its running job; waiting jobs are dropped (the next
        request starts a new thread)."""
        with self._lock:
            pool, self.pool, self.pending = self.pool, None, 0
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class BodyLimit:
    """ASGI middleware: a request whose Content-Length is over `max_bytes` gets a 413 before its
    body is read."""

    def __init__(self, app, max_bytes: int, max_chars: int):
        self.app, self.max_bytes, self.max_chars = app, max_bytes, max_chars

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length", b"0")
            if not size.isdigit() or int(size) > self.max_bytes:
                response = JSONResponse(
                    {
                        "error": f"The request body is {size.decode(errors='replace')} bytes; "
                        f"send a text of at most {self.max_chars} characters."
                    },
                    status_code=413,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _asset(name: str) -> bytes:
    return resources.files("consistency_lens.serve").joinpath("static", name).read_bytes()


def lens_info(name: str, lens) -> dict:
    """What the page shows of a loaded lens (never its path on disk)."""
    return {
        "name": name,
        "model": Path(lens.loaded.name).name,  # a local model's folder name, not its path
        "layer": lens.layer,
        "t_text": lens.cfg.train.t_text,
        "mode": lens.cfg.train.mode,
    }


def unique_names(paths: list[Path]) -> list[str]:
    """A short name per lens directory (its folder name; `-2`, `-3` appended to repeats)."""
    names: list[str] = []
    for path in paths:
        base = Path(path).resolve().name or "lens"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def create_app(
    lenses: dict[str, Any], limits: Limits | None = None, batch_size: int = 64
) -> FastAPI:
    """The viewer app over already loaded lenses (name -> lens; the first is the default)."""
    from consistency_lens.evaluation.explain import explain_text, sample_explanations

    if not lenses:
        raise LensError("The viewer needs at least one lens; pass --checkpoint DIR.")
    limits = limits or Limits()
    default = next(iter(lenses))
    assets = {name: _asset(name) for name in ASSETS}
    worker = Worker(limits.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(
        title="consistency-lens viewer",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.worker = worker

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            message = (
                'The request body is not valid JSON; send a JSON object such as {"text": "..."}.'
            )
        else:
            where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
            message = (
                f"The request's '{where}' is wrong ({first.get('msg', 'invalid')}); send a JSON "
                "object with a string 'text' and optionally 'lens' (and 'position' for samples)."
            )
        return JSONResponse({"error": message}, status_code=400)

    app.add_middleware(BodyLimit, max_bytes=8 * limits.max_chars + 4096, max_chars=limits.max_chars)

    def pick(name: str | None):
        name = default if name is None else name
        if name not in lenses:
            raise HTTPProblem(
                404,
                f"No lens named '{name}' is loaded; choose one of: {', '.join(lenses)}.",
            )
        return name, lenses[name]

    def check_length(text: str) -> None:
        if len(text) > limits.max_chars:
            raise HTTPProblem(
                413,
                f"The text is {len(text)} characters long but this server explains at most "
                f"{limits.max_chars}; send a shorter text.",
            )

    def check_tokens(lens, text: str) -> None:
        n = len(lens.loaded.tokenizer(text).input_ids)
        if n > limits.max_tokens:
            raise HTTPProblem(
                413,
                f"The text is {n} tokens long but this server explains at most "
                f"{limits.max_tokens}; send a shorter text.",
            )

    def run_explain(lens, text: str) -> list[dict]:
        check_tokens(lens, text)
        return explain_text(lens, text, batch_size, top_k=TOP_K)

    def run_samples(lens, body: SamplesRequest) -> list[dict]:
        check_tokens(lens, body.text)
        return sample_explanations(lens, body.text, body.position, body.num, seed=body.seed)

    def user_error(err: LensError) -> HTTPProblem:
        too_long = "at most" in str(err)
        return HTTPProblem(413 if too_long else 400, str(err))

    @app.get("/")
    async def index() -> Response:
        return Response(assets["index.html"], media_type=ASSETS["index.html"])

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in assets or name == "index.html":
            raise HTTPProblem(
                404, f"No asset named '{name}'; the page needs only app.js and style.css."
            )
        return Response(
            assets[name],
            media_type=ASSETS[name],
            headers={"Cache-Control": "no-cache"},
        )

    @app.get("/api/lenses")
    async def list_lenses() -> dict:
        return {
            "default": default,
            "lenses": [lens_info(n, lens) for n, lens in lenses.items()],
            "max_chars": limits.max_chars,
            "max_tokens": limits.max_tokens,
            "top_k": TOP_K,
        }

    @app.post("/api/explain")
    async def explain(body: ExplainRequest, request: Request) -> dict:
        name, lens = pick(body.lens)
        check_length(body.text)
        try:
            rows = await worker.submit(request, run_explain, lens, body.text)
        except LensError as err:
            raise user_error(err) from None
        return {"lens": name, "text": body.text, "rows": rows}

    @app.post("/api/samples")
    async def samples(body: SamplesRequest, request: Request) -> dict:
        name, lens = pick(body.lens)
        check_length(body.text)
        if body.num > limits.max_samples:
            raise HTTPProblem(
                400, f"'num' is {body.num}; ask for at most {limits.max_samples} samples."
            )
        try:
            out = await worker.submit(request, run_samples, lens, body)
        except LensError as err:
            raise user_error(err) from None
        return {"lens": name, "position": body.position, "samples": out}

    return app


def load_lenses(cfg, checkpoints: list[Path]) -> dict[str, Any]:
    """Load each lens directory through the project's lens loading (the shipped lens for
    `cfg.model` when none is given), keyed by a short unique name."""
    from consistency_lens.evaluation.saved_lens import load_lens
    from consistency_lens.shipped import shipped_lens

    if not checkpoints:
        shipped = shipped_lens(cfg.model)
        if shipped is None:
            raise LensError(
                f"No lens is shipped for model '{cfg.model}'; pass --checkpoint DIR (repeatable)."
            )
        checkpoints = [shipped]
    lenses = {}
    for name, path in zip(unique_names(checkpoints), checkpoints, strict=True):
        lenses[name], _ = load_lens(cfg, Path(path))
        print(f"lens '{name}': {path}")
    return lenses


def serve_command(
    cfg, checkpoints: list[Path], host: str, port: int, limits: Limits | None = None
) -> None:
    """Load the lenses, then serve the viewer with uvicorn until interrupted."""
    import uvicorn

    app = create_app(load_lenses(cfg, checkpoints), limits, batch_size=cfg.eval.batch_size)
    print(f"lens viewer: http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning")
