"""The viewer's JSON API through FastAPI's test client and a real uvicorn server, on tiny random
lenses: exact values against a direct computation, the refusals, the one worker."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from serving import tiny_lenses

from consistency_lens.cli import build_command
from consistency_lens.serve.app import Limits, create_app, load_lenses
from consistency_lens.serve.background import running

TEXT = "the nation economy congress people"


@pytest.fixture(scope="module")
def lenses(tmp_path_factory, tiny_llama_dir):
    """The two tiny lenses, loaded through the project's lens loading."""
    cfg, paths = tiny_lenses(tmp_path_factory.mktemp("lenses"), tiny_llama_dir)
    return load_lenses(cfg, paths)


@pytest.fixture(scope="module")
def client(lenses):
    """A test client of an app with small limits (200 characters, 40 tokens)."""
    return TestClient(create_app(lenses, Limits(max_chars=200, max_tokens=40)))


def test_lenses_are_listed_by_name_never_by_path(client, lenses):
    info = client.get("/api/lenses").json()
    assert info["default"] == "alpha"
    assert [lens["name"] for lens in info["lenses"]] == ["alpha", "beta"]
    assert [lens["t_text"] for lens in info["lenses"]] == [3, 2]
    assert "/" not in str(info["lenses"])  # no path on disk reaches the page


@torch.no_grad()
def test_explain_rows_hold_the_top5_of_m_and_of_the_reconstruction_exactly(client, lenses):
    answer = client.post("/api/explain", json={"text": TEXT}).json()
    assert answer["lens"] == "alpha" and answer["text"] == TEXT
    rows = answer["rows"]
    lens = lenses["alpha"]
    tok = lens.loaded.tokenizer
    ids = tok(TEXT).input_ids
    assert "".join(r["token"] for r in rows) == TEXT
    for r in rows:
        p = r["position"]
        prefix = torch.tensor([ids[: p + 1]])
        # M's own next-token distribution at P, from a plain full forward.
        probs = lens.orig.model(prefix).logits[0, -1].float().softmax(-1)
        top = probs.topk(5)
        assert [t for t, _ in r["top_model"]] == [tok.decode([i]) for i in top.indices.tolist()]
        assert [q for _, q in r["top_model"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        # The same with D's greedy text encoded by E and patched in at P (the naive forward).
        A = lens.orig.activations(prefix, torch.ones_like(prefix))
        expl, A_hat = lens.reconstruct(A)
        assert r["explanation"] == tok.decode(expl[0].tolist())
        (patched,) = lens.orig.naive_forward_with_replacement(
            prefix, torch.ones_like(prefix), [A_hat]
        )
        ptop = patched[0].float().softmax(-1).topk(5)
        assert [t for t, _ in r["top_lens"]] == [tok.decode([i]) for i in ptop.indices.tolist()]
        assert [q for _, q in r["top_lens"]] == pytest.approx(ptop.values.tolist(), abs=1e-5)
        kl = (probs * (probs.log() - patched[0].float().log_softmax(-1))).sum()
        assert r["kl"] == pytest.approx(float(kl), abs=1e-4)
    other = client.post("/api/explain", json={"text": TEXT, "lens": "beta"}).json()
    assert other["lens"] == "beta"
    assert [r["top_model"] for r in other["rows"]] == [r["top_model"] for r in rows]
    beta = lenses["beta"]
    last = torch.tensor([ids])
    expl, _ = beta.reconstruct(beta.orig.activations(last, torch.ones_like(last)))
    assert expl.shape[1] == 2 and other["rows"][-1]["explanation"] == tok.decode(expl[0].tolist())


def test_samples_are_seeded_and_checked(client):
    body = {"text": TEXT, "lens": "alpha", "position": 2, "num": 3}
    first = client.post("/api/samples", json=body).json()
    assert len(first["samples"]) == 3 and first["position"] == 2
    assert client.post("/api/samples", json=body).json() == first
    assert all(s["kl"] >= 0 and -1 <= s["cosine"] <= 1 for s in first["samples"])
    bad = client.post("/api/samples", json={**body, "position": 99})
    assert bad.status_code == 400 and "not a token of the text" in bad.json()["error"]
    many = client.post("/api/samples", json={**body, "num": 50})
    assert many.status_code == 400
    assert many.json() == {"error": "'num' is 50; ask for at most 8 samples."}


def test_refusals_are_one_sentence_with_the_right_status(client):
    long = client.post("/api/explain", json={"text": "x" * 201})
    assert long.status_code == 413
    assert long.json() == {
        "error": "The text is 201 characters long but this server explains at most 200; "
        "send a shorter text."
    }
    tokens = client.post("/api/explain", json={"text": "a " * 90})
    assert (
        tokens.status_code == 413
        and "tokens long but this server explains at most 40" in (tokens.json()["error"])
    )
    huge = client.post("/api/explain", content=b"{" + b" " * 10_000 + b"}")
    assert huge.status_code == 413 and "at most 200 characters" in huge.json()["error"]
    bad = client.post(
        "/api/explain", content=b'{"text": "no end', headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 400
    assert bad.json() == {
        "error": 'The request body is not valid JSON; send a JSON object such as {"text": "..."}.'
    }
    missing = client.post("/api/explain", json={"txt": "a"})
    assert missing.status_code == 400 and "'text'" in missing.json()["error"]
    unknown = client.post("/api/explain", json={"text": "a", "lens": "../alpha"})
    assert unknown.status_code == 404
    assert unknown.json() == {
        "error": "No lens named '../alpha' is loaded; choose one of: alpha, beta."
    }
    empty = client.post("/api/explain", json={"text": ""})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]


def test_no_request_reads_or_writes_a_file(client):
    """Every route, traversal attempts included, runs without a single file open (audit hook)."""
    client.get("/")  # warm: the first request may import lazily loaded modules
    opened: list[str] = []
    watching = threading.Event()

    def hook(event, args):
        if watching.is_set() and event == "open":
            opened.append(str(args[0]))

    sys.addaudithook(hook)
    watching.set()
    try:
        assert client.get("/").status_code == 200
        assert client.get("/static/app.js").status_code == 200
        for path in (
            "/static/../app.py",
            "/static/..%2fapp.py",
            "/static/%2e%2e/%2e%2e/pyproject.toml",
            "/static/index.html",
            "/etc/passwd",
            "/static//etc/passwd",
        ):
            assert client.get(path).status_code == 404, path
        assert client.post("/api/explain", json={"text": TEXT, "lens": "beta"}).status_code == 200
        assert client.post("/api/explain", json={"text": "a", "lens": "/etc"}).status_code == 404
    finally:
        watching.clear()
    assert opened == []


def test_the_page_and_its_assets_come_from_the_server(client):
    page = client.get("/?text=the+nation&lens=beta&pos=1")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<script src="/static/app.js">' in html and "http" not in html.split("<body>")[1]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.headers["content-type"].startswith(kind)
        assert "http://" not in asset.text and "https://" not in asset.text
    assert ".innerHTML" not in client.get("/static/app.js").text


def test_serve_binds_localhost_by_default():
    assert build_command(["serve"]).host == "127.0.0.1"
    assert build_command(["serve", "--host", "0.0.0.0", "--port", "9"]).port == 9


def _send_and_leave(base: str, body: bytes) -> None:
    """Send one explain request and close the connection without reading the answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /api/explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )


def test_a_client_that_leaves_is_dropped_and_never_wedges_the_worker(lenses):
    import httpx

    app = create_app(lenses)
    worker = app.state.worker
    with running(app) as base:
        assert httpx.post(f"{base}/api/explain", json={"text": TEXT}).status_code == 200
        ran = worker.ran
        gate = threading.Event()
        worker.pool.submit(gate.wait, 30)  # the worker is busy with something else
        for _ in range(3):
            _send_and_leave(base, b'{"text": "the nation"}')
        deadline = time.monotonic() + 20
        while worker.dropped < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        gate.set()
        assert worker.dropped == 3  # dropped before their turn, never run
        answer = httpx.post(f"{base}/api/explain", json={"text": TEXT}, timeout=30)
        assert answer.status_code == 200 and worker.ran == ran + 1
        assert worker.pending == 0


def test_a_full_queue_answers_503_and_the_waiting_request_still_runs(lenses):
    """With `max_queue` requests waiting, one more gets a 503 with one sentence at once; the one
    that waited is answered when the worker is free, and the queue is empty after."""
    import concurrent.futures

    import httpx

    app = create_app(lenses, Limits(max_queue=1))
    worker = app.state.worker
    with running(app) as base:
        assert httpx.post(f"{base}/api/explain", json={"text": TEXT}).status_code == 200
        gate = threading.Event()
        worker.pool.submit(gate.wait, 30)  # the worker is busy with something else
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                httpx.post, f"{base}/api/explain", json={"text": TEXT}, timeout=60
            )
            deadline = time.monotonic() + 20
            while worker.pending < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert worker.pending == 1
            refused = httpx.post(f"{base}/api/explain", json={"text": TEXT}, timeout=10)
            gate.set()
            answered = waiting.result()
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert "1 requests waiting" in error and error.count(".") == 1
        assert answered.status_code == 200 and answered.json()["rows"]
        assert worker.pending == 0


def test_the_serve_command_serves_named_lenses_and_stops(tmp_path, tiny_llama_dir, capsys):
    """`consistency-lens serve` end to end in its own process; a missing lens is one sentence."""
    import subprocess
    from pathlib import Path

    import httpx
    from conftest import cli_error, free_port

    cfg, paths = tiny_lenses(tmp_path, tiny_llama_dir)
    port = free_port()
    overrides = [f"model={cfg.model}", "device=cpu", "model_dtype=float32"]
    argv = ["serve", "--checkpoint", str(paths[1]), "--port", str(port), "--threads", "1"]
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(
        [sys.executable, "-m", "consistency_lens", *argv, *overrides],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/api/lenses").json()
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "serve did not answer within 120 s"
                time.sleep(0.2)
        assert info["default"] == "beta" and [x["name"] for x in info["lenses"]] == ["beta"]
    finally:
        server.terminate()
        server.wait(30)
    line = cli_error(capsys, ["serve", "--checkpoint", str(tmp_path / "nowhere"), *overrides])
    assert "No saved lens at" in line
