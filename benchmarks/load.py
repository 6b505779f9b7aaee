"""Closed-loop load generation against the fleet (ZeroMQ) or an OpenAI-style HTTP server.

N client threads each send requests back to back from a shared list of prompts.
Every request records its time to first token, its inter-token gaps and its total
latency. The same driver runs against every system, so only the server differs.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.stats import percentile

Requester = Callable[[str], "RequestSample"]


@dataclass
class RequestSample:
    """One request as a client saw it (seconds)."""

    ttft_s: float
    total_s: float
    completion_tokens: int
    itl_s: list[float] = field(default_factory=list)
    ok: bool = True
    error: str = ""
    started_s: float = 0.0
    path: str = ""  # the fleet's done.timings.path: solo | batch | handoff ("" elsewhere)
    retries: int = 0  # attempts after the first (HTTP: refused or dropped connections, 408/409/429/5xx)


class TokenTimer:
    """Time to first token and the gaps between later ones, from when it is made."""

    def __init__(self) -> None:
        self.t0_s = time.perf_counter()
        self.last_s = self.t0_s
        self.ttft_s = 0.0
        self.gaps_s: list[float] = []

    def token(self) -> None:
        """New output arrived now."""
        now = time.perf_counter()
        if not self.ttft_s:
            self.ttft_s = now - self.t0_s
        else:
            self.gaps_s.append(now - self.last_s)
        self.last_s = now

    def sample(self, completion_tokens: int) -> RequestSample:
        """The finished request (a request with no output has TTFT = its total)."""
        total = time.perf_counter() - self.t0_s
        return RequestSample(self.ttft_s or total, total, completion_tokens, self.gaps_s)


@dataclass
class LoadRun:
    """All requests of one load level."""

    clients: int
    wall_s: float
    samples: list[RequestSample]
    engine: dict[str, Any] | None = None  # a fleet's engine figures for the run (benchmarks.fleet_probe)

    @property
    def ok(self) -> list[RequestSample]:
        """Successful requests."""
        return [s for s in self.samples if s.ok]

    def opening(self) -> tuple[list[RequestSample], list[RequestSample]]:
        """(each client's first request: the burst that opens the run, every later request), by start time."""
        ordered = sorted(self.samples, key=lambda s: s.started_s)
        return ordered[: self.clients], ordered[self.clients:]

    def summary(self) -> dict[str, Any]:
        """Aggregate tok/s, TTFT and ITL percentiles, success rate."""
        ok = self.ok
        tokens = sum(s.completion_tokens for s in ok)
        ttft = [s.ttft_s for s in ok]
        itl = [g for s in ok for g in s.itl_s]
        total = [s.total_s for s in ok]

        def pct(values: list[float], q: float) -> float | None:
            return percentile(values, q) if values else None

        return {
            "clients": self.clients, "requests": len(self.samples), "ok": len(ok),
            "success_rate": len(ok) / len(self.samples) if self.samples else 0.0,
            "wall_s": self.wall_s, "tokens": tokens, "tok_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "total_p50_s": pct(total, 50), "total_p99_s": pct(total, 99),
            "errors": sorted({s.error for s in self.samples if not s.ok}),
            "retried": sum(1 for s in self.samples if s.retries), "retries": sum(s.retries for s in self.samples),
        }


def run_load(make_requester: Callable[[], tuple[Requester, Callable[[], None]]], clients: int,
             prompts: list[str], *, timeout_s: float = 600.0) -> LoadRun:
    """Send every prompt once, from ``clients`` threads; returns when all are done."""
    lock = threading.Lock()
    next_index = [0]
    samples: list[RequestSample] = []
    start = threading.Barrier(clients + 1)

    def client_loop() -> None:
        send, close = make_requester()
        try:
            start.wait(60)
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(prompts):
                    return
                t0 = time.perf_counter()
                try:
                    sample = send(prompts[i])
                except Exception as exc:  # recorded as a failed request
                    sample = RequestSample(0.0, time.perf_counter() - t0, 0, ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
                sample.started_s = t0
                with lock:
                    samples.append(sample)
        finally:
            close()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait(60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(max(0.0, timeout_s - (time.perf_counter() - t0)))
    return LoadRun(clients, time.perf_counter() - t0, samples)


def run_direct(make_requester: Callable[[], tuple[Requester, Callable[[], None]]], prompts: list[str]) -> LoadRun:
    """One client in the calling thread (no client thread), one prompt after another."""
    send, close = make_requester()
    samples: list[RequestSample] = []
    t0 = time.perf_counter()
    try:
        for prompt in prompts:
            started = time.perf_counter()
            try:
                sample = send(prompt)
            except Exception as exc:  # recorded as a failed request, as run_load does
                sample = RequestSample(0.0, time.perf_counter() - started, 0, ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
            sample.started_s = started
            samples.append(sample)
    finally:
        close()
    return LoadRun(1, time.perf_counter() - t0, samples)


def fleet_requester(frontend: str, model: str, max_tokens: int, *, chat: bool = False,
                    **options: Any) -> Callable[[], tuple[Requester, Callable[[], None]]]:
    """A factory of per-thread requesters over the ZeroMQ client (``chat``: each prompt as one user message)."""
    from mlx_fleet.client import Client

    def make() -> tuple[Requester, Callable[[], None]]:
        client = Client(frontend, timeout_s=300)

        def send(prompt: str) -> RequestSample:
            timer = TokenTimer()
            text = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
            stream = client.stream(model=model, max_tokens=max_tokens, **text, **options)
            for _ in stream:
                timer.token()
            assert stream.completion is not None
            sample = timer.sample(stream.completion.usage.get("completion_tokens", 0))
            sample.path = str(stream.completion.timings.get("path", ""))
            return sample

        return send, client.close

    return make


# What the official OpenAI clients do by default, which is what an HTTP user meets: two more
# attempts after a connection that is refused or dropped, or a 408, 409, 429 or 5xx, with
# exponential backoff from 0.5 s (at most 8 s), shortened by up to a quarter at random.
HTTP_MAX_RETRIES = 2
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
RETRY_ERRORS = (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest, socket.timeout)


def retry_delay_s(attempt: int) -> float:
    """How long to wait before retry number ``attempt`` (1-based)."""
    return min(0.5 * 2.0 ** (attempt - 1), 8.0) * (1 - 0.25 * random.random())


def http_requester(port: int, model: str, max_tokens: int, *, host: str = "127.0.0.1",
                   headers: dict[str, str] | None = None, chat: bool = False,
                   max_retries: int = HTTP_MAX_RETRIES) -> Callable[[], tuple[Requester, Callable[[], None]]]:
    """A factory of per-thread requesters for an OpenAI-style /v1/completions with SSE
    (``chat``: /v1/chat/completions, each prompt as one user message).

    A request is retried as the OpenAI clients retry it (``max_retries``); its TTFT and total
    run from the first attempt, and the sample counts its retries.
    """
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def make() -> tuple[Requester, Callable[[], None]]:
        conn = http.client.HTTPConnection(host, port, timeout=300)

        def attempt(body: str, timer: TokenTimer) -> tuple[int, int, bytes]:
            """One try: (status, completion tokens, the start of an error body)."""
            conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            if resp.status != 200:
                return resp.status, 0, resp.read()[:200]
            tokens = 0
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    tokens = event["usage"].get("completion_tokens", tokens)
                choice = (event.get("choices") or [{}])[0]
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    timer.token()
            resp.read()
            return 200, tokens, b""

        def send(prompt: str) -> RequestSample:
            text = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
            body = json.dumps({"model": model, **text, "max_tokens": max_tokens, "temperature": 0.0,
                               "stream": True, "stream_options": {"include_usage": True}})
            timer = TokenTimer()
            for tries in range(max_retries + 1):
                if tries:
                    time.sleep(retry_delay_s(tries))
                try:
                    status, tokens, error = attempt(body, timer)
                except RETRY_ERRORS as exc:
                    conn.close()  # the next try opens a fresh connection
                    if tries == max_retries or timer.ttft_s:  # output had begun: not retried
                        raise RuntimeError(f"{type(exc).__name__} after {tries} retries: {exc}") from exc
                    continue
                if status == 200:
                    sample = timer.sample(tokens)
                    sample.retries = tries
                    return sample
                if status not in RETRY_STATUSES or tries == max_retries:
                    raise RuntimeError(f"HTTP {status} after {tries} retries: {error!r}")
            raise AssertionError("unreachable")

        return send, conn.close

    return make


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlxLmServer:
    """``python -m mlx_lm.server`` on a model folder, with a given BLAS; a context manager."""

    def __init__(self, model_path: str, *, env: dict[str, str] | None = None, ready_timeout_s: float = 120.0,
                 extra_args: list[str] | None = None) -> None:
        self.port = free_port()
        self.model_path = model_path
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "MlxLmServer":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", self.model_path, "--port", str(self.port),
             "--log-level", "WARNING", *self.extra_args],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited with {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    conn.close()
                    return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"mlx_lm.server not ready within {self.ready_timeout_s}s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
