"""The benchmarks' HTTP client retries as the OpenAI clients do, against a small local server (no MLX)."""

from __future__ import annotations

import http.server
import threading
from typing import Any, Iterator

import pytest

from benchmarks import load
from benchmarks.load import http_requester, retry_delay_s

pytestmark = pytest.mark.timeout(20)

SSE = (b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
       b'data: {"choices": [], "usage": {"completion_tokens": 1}}\n\ndata: [DONE]\n\n')


class Script:
    """What the server does with each request, in order: "drop" (close the connection), a status, or "ok"."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps
        self.seen = 0


def serve(script: Script) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            step = script.steps[min(script.seen, len(script.steps) - 1)]
            script.seen += 1
            if step == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if step == "ok":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(SSE)))
                self.end_headers()
                self.wfile.write(SSE)
                return
            self.send_response(int(step))
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(load, "retry_delay_s", lambda attempt: 0.01)
    yield


def run(steps: list[Any], max_retries: int = 2) -> tuple[Any, Script]:
    script = Script(steps)
    server, port = serve(script)
    try:
        send, close = http_requester(port, "m", 4, chat=True, max_retries=max_retries)()
        try:
            return send("hello"), script
        finally:
            close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_dropped_connection_and_a_503_are_retried_and_counted() -> None:
    sample, script = run(["drop", 503, "ok"])
    assert (sample.ok, sample.retries, sample.completion_tokens, script.seen) == (True, 2, 1, 3)
    assert sample.ttft_s > 0


def test_a_400_is_not_retried() -> None:
    with pytest.raises(RuntimeError, match=r"HTTP 400 after 0 retries"):
        run([400, "ok"])


def test_retries_stop_at_the_limit() -> None:
    with pytest.raises(RuntimeError, match="after 1 retries"):
        run(["drop", "drop", "ok"], max_retries=1)


def test_the_backoff_is_the_openai_clients() -> None:
    for attempt, full in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 8.0), (9, 8.0)]:
        delay = retry_delay_s(attempt)
        assert 0.75 * full <= delay <= full
