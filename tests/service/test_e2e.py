"""End to end: `genserve serve` as a real process on a free port, called over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import b64, decode_png, gray_png
from tests.service.test_sampling import parse_sse

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerLog:
    """The server's log lines, read on a thread so the test can wait for a given line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._thread = threading.Thread(target=self._read, args=(self._stream,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """After the process has exited: let the reader reach end of file, then close the pipe."""
        self._thread.join(timeout=10)
        self._stream.close()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, *needles: str, timeout: float = 60.0) -> None:
        """Block until every needle has appeared in some line (the process exiting fails the test)."""
        missing = set(needles)
        deadline = time.monotonic() + timeout
        missing -= {n for n in missing if any(n in line for line in self.lines)}
        while missing:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"server did not log {sorted(missing)} in {timeout} s:\n{''.join(self.lines)}")
            if line is None:
                pytest.fail(f"server exited before logging {sorted(missing)}:\n{''.join(self.lines)}")
            self.lines.append(line)
            missing -= {n for n in missing if n in line}


def start_server(
    model_dir: Path, *, models: tuple[str, ...] = ("pixelcnn", "vae"), **env: str
) -> tuple[subprocess.Popen[str], str, ServerLog]:
    """`genserve serve` of the tiny ``models`` on a free port, JSON logs, ``env`` added;
    returns once every model is ready."""
    port = free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "GENSERVE_MAX_BATCH_WAIT_MS": "1", **env}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--model-dir", str(model_dir)]
    proc = subprocess.Popen(
        [*cmd, "--models", ",".join(models), "--json-logs"], cwd=ROOT, env=full_env, stderr=subprocess.PIPE, text=True
    )
    log = ServerLog(proc)
    try:
        log.wait_for("Uvicorn running on", *(f"model '{m}' ready" for m in models))
    except BaseException:
        stop_server(proc, log)
        raise
    return proc, f"http://127.0.0.1:{port}", log


def stop_server(proc: subprocess.Popen[str], log: ServerLog) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture
def server(model_dir: Path) -> Iterator[tuple[str, ServerLog]]:
    proc, url, log = start_server(model_dir)
    try:
        yield url, log
    finally:
        stop_server(proc, log)


@pytest.mark.slow
def test_real_server_samples_and_scores(server):
    url, log = server
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["models"] == ["pixelcnn", "vae"]
        r = client.post("/sample", json={"model": "pixelcnn", "n": 2, "seed": 11})
        assert r.status_code == 200 and r.json()["seed"] == 11
        assert decode_png(r.json()["images"][0]).size == (8, 8)
        r = client.post("/score", json={"model": "pixelcnn", "images": [b64(gray_png(0)), b64(gray_png(1))]})
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        files = [("files", ("a.png", gray_png(2), "image/png"))]
        r = client.post("/score", data={"model": "vae"}, files=files, headers={"X-Request-ID": "e2e-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "e2e-1"
        assert "genserve_requests_total" in client.get("/metrics").text
    log.wait_for('"request_id": "e2e-1"')  # one JSON log line per request


@pytest.mark.slow
def test_real_server_streams_samples_to_curl_and_httpx(server):
    url, _ = server
    body = {"model": "pixelcnn", "n": 2, "seed": 4}
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/sample/stream?partial_every=4", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in r.headers  # sent as it is made, not buffered
            text = "".join(r.iter_text())
        plain = client.post("/sample", json=body).json()
    events = parse_sse(text)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "result"
    assert names.count("progress") == 8 and names.count("partial") == 1  # 8 rows; the last ones come as the result
    assert events[-1][1]["images"] == plain["images"]

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        [curl, "-sN", "-X", "POST", f"{url}/sample/stream", "-H", "Content-Type: application/json",
         "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert parse_sse(out)[-1][1]["images"] == plain["images"]


def partial_score_request(url: str, body: bytes) -> tuple[socket.socket, bytes]:
    """Open a connection and send a /score request's headers and the first half of ``body``;
    returns the socket and the half still to send."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    half = len(body) // 2
    sock.sendall(head + body[:half])
    return sock, body[half:]


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (b"" if it sends nothing; a reset
    ends it too)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_in_flight(url: str, n: int, timeout: float = 30.0) -> None:
    """Poll /metrics until ``n`` other requests are being served (the poll itself is one more)."""
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        line = next(x for x in text.splitlines() if x.startswith("genserve_in_flight_requests "))
        if float(line.split()[1]) == n + 1:
            return
    pytest.fail(f"expected {n} requests in flight within {timeout} s; last: {line}")


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_then_cancels_the_rest(model_dir):
    """On SIGTERM the server refuses new connections, answers a request already in flight (here one
    whose body is still arriving), and after GENSERVE_SHUTDOWN_TIMEOUT_S cancels what is left (a
    client that never finishes its upload) and exits, instead of waiting for it forever."""
    timeout_s = 2
    proc, url, log = start_server(model_dir, GENSERVE_SHUTDOWN_TIMEOUT_S=str(timeout_s))
    body = json.dumps({"model": "vae", "images": [b64(gray_png(3))]}).encode()
    finishing, rest = partial_score_request(url, body)
    stalled, _ = partial_score_request(url, body)
    try:
        wait_in_flight(url, 2)  # both requests are inside the app, waiting for the rest of their bodies
        sent_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        log.wait_for("Waiting for connections to close")
        with pytest.raises(OSError):  # the listening socket is closed: new clients go elsewhere
            socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5).close()

        finishing.sendall(rest)
        head, _, payload = read_response(finishing).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"connection: close" in head.lower()  # no keep-alive while draining
        assert len(json.loads(payload)["results"]) == 1
        assert proc.poll() is None  # still draining: the stalled upload holds it until the timeout

        proc.wait(timeout=timeout_s + 15)
        took = time.monotonic() - sent_term
        assert timeout_s - 0.2 <= took < timeout_s + 15
        log.wait_for("Cancel 1 running task(s)", "Application shutdown complete")
        assert not read_response(stalled).startswith(b"HTTP/1.1 200")
    finally:
        finishing.close()
        stalled.close()
        stop_server(proc, log)


@pytest.mark.slow
def test_real_server_answers_a_trickled_body_408_and_closes_the_connection(model_dir: Path) -> None:
    proc, url, log = start_server(model_dir, GENSERVE_BODY_TIMEOUT_S="1")
    body = json.dumps({"model": "pixelcnn", "images": [b64(gray_png())]}).encode()
    sock, _ = partial_score_request(url, body)  # half the body, then nothing
    try:
        start = time.monotonic()
        head, _, payload = read_response(sock).partition(b"\r\n\r\n")  # returns once the server closes
        assert 0.9 <= time.monotonic() - start < 10
        assert head.startswith(b"HTTP/1.1 408"), head
        assert "GENSERVE_BODY_TIMEOUT_S" in json.loads(payload)["detail"]
        r = httpx.post(f"{url}/score", json={"model": "pixelcnn", "images": [b64(gray_png())]}, timeout=30)
        assert r.status_code == 200
    finally:
        sock.close()
        stop_server(proc, log)
