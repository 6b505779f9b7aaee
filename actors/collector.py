"""The collector actor: PULL metric events, aggregate them, serve Prometheus.

Two threads: the main one receives events (PULL, bound to ``metrics_events``)
and folds them into a :class:`~actors.collector_state.CollectorState`; a small
threaded HTTP server on ``metrics_host:metrics_port`` answers

- ``/metrics``: Prometheus text (or OpenMetrics when asked), rendered at scrape
  time from a snapshot by one custom collector in a private registry;
- ``/health``: 200 while the collector runs;
- ``/ready``: 200 when every configured model has a registered worker, else
  503; the JSON body names the models missing.

One lock guards the state. Nothing here is on the serving path: senders drop
events when the collector is slow or gone.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import zmq
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from actors.clock import MonotonicClock
from actors.collector_state import CollectorState, Snapshot
from actors.config import FleetConfig
from actors.metrics import MAX_EVENT_BYTES, STEP_TIME_PARTS, WORKER_STATES
from actors.runtime import Hooks, StartError, run_process

log = logging.getLogger("mlx_fleet.collector")

PREFIX = "mlxfleet_"
# (key in ModelStats.histograms, metric name, help)
HISTOGRAMS = (
    ("ttft", "time_to_first_token_seconds",
     "Time from broker acceptance to the first generated token, of requests that ended in a done reply."),
    ("itl", "inter_token_latency_seconds",
     "Time between consecutive generated tokens of a request that ended in a done reply."),
    ("e2e", "e2e_request_latency_seconds",
     "Time from broker acceptance to the done reply, of requests a worker ended with done (not errors)."),
    ("queue", "request_queue_time_seconds",
     "Time from broker acceptance until a worker admitted the request, of requests that ended in a done reply."),
    ("batch_size", "batch_size",
     "Sequences decoded per engine step (every sequence, also of requests later cut short)."),
    ("window_wait", "batch_window_wait_seconds",
     "Time the oldest request of each admitted batch waited at the worker (batching window, free slot)."),
)


class FleetMetrics:
    """A prometheus_client custom collector: builds every family from a snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Yield the fleet's metric families (called by the registry on each scrape)."""
        snap = self._snapshot()
        yield from _histograms(snap)
        yield from _counters(snap)
        yield from _gauges(snap)


def _histograms(snap: Snapshot) -> Iterator[Metric]:
    for key, name, doc in HISTOGRAMS:
        fam = HistogramMetricFamily(PREFIX + name, doc, labels=["model"])
        for model in snap.models:
            h = snap.stats[model].histograms[key]
            fam.add_metric([model], h.cumulative(), h.sum)
        yield fam


def _counters(snap: Snapshot) -> Iterator[Metric]:
    models = snap.models
    reqs = CounterMetricFamily(PREFIX + "requests", "Requests finished with a done reply, by finish reason.",
                               labels=["model", "finish_reason"])
    errs = CounterMetricFamily(PREFIX + "request_errors",
                               "Error replies by code; model is empty when the request named no served model.",
                               labels=["model", "code"])
    prompt = CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", labels=["model"])
    gen = CounterMetricFamily(PREFIX + "generation_tokens", "Tokens generated for finished requests.",
                              labels=["model"])
    routed = CounterMetricFamily(PREFIX + "routed_requests",
                                 "Requests the broker dispatched, by why it chose their replica: affinity (the key's "
                                 "replica), prefix (it held the longest cached prefix), least_loaded (none held any), "
                                 "imbalance (the loads were out of balance).", labels=["model", "reason"])
    blocks = HistogramMetricFamily(PREFIX + "routed_prefix_blocks",
                                   "Prefix blocks (16 tokens, one chat message, or 64 characters each) the chosen "
                                   "replica held, of requests routed by prefix.", labels=["model"])
    for model, c in snap.broker_counters.items():
        if model:
            for reason, n in c["requests"].items():
                reqs.add_metric([model, reason], n)
            prompt.add_metric([model], c["prompt_tokens"])
            gen.add_metric([model], c["generation_tokens"])
            for reason, n in c["routed"].items():
                routed.add_metric([model, reason], n)
            blocks.add_metric([model], c["prefix_blocks"].cumulative(), c["prefix_blocks"].sum)
        for code, n in c["errors"].items():
            errs.add_metric([model, code], n)
    yield from (reqs, errs, prompt, gen, routed, blocks)

    fast = CounterMetricFamily(PREFIX + "fast_path_admissions",
                               "Requests admitted at once by the fast path (nothing else waiting or running).",
                               labels=["model"])
    for model in models:
        fast.add_metric([model], snap.stats[model].fast_path_admissions)
    yield fast

    yield from _engine_counters(snap)

    restarts = CounterMetricFamily(PREFIX + "worker_restarts", "Times the supervisor restarted a worker process.",
                                   labels=["model", "worker"])
    for worker, (model, n) in sorted(snap.restarts.items()):
        restarts.add_metric([model, worker], n)
    yield restarts

    drops = CounterMetricFamily(PREFIX + "dropped_events",
                                "Metric events dropped: by senders whose queue to the collector was full or "
                                "unconnected, and by the collector (malformed, over label limits).",
                                labels=["source", "reason"])
    for (source, reason), n in sorted(snap.drops.items()):
        drops.add_metric([source, reason], n)
    yield drops


def _engine_counters(snap: Snapshot) -> Iterator[Metric]:
    """Engine time per worker (all of it, and split mlx-lm/own), and requests and decode steps by path."""
    busy = CounterMetricFamily(PREFIX + "engine_busy_seconds", "Seconds a worker spent in engine steps.",
                               labels=["model", "worker"])
    split = CounterMetricFamily(PREFIX + "engine_time_seconds",
                                "A worker's busy time from one engine step to the next: inside mlx-lm (part=mlx_lm) "
                                "and in the worker's own code around it (part=own).", labels=["model", "worker", "part"])
    for worker, g in sorted(snap.workers.items()):
        busy.add_metric([g.model, worker], g.busy_s)
        for part, seconds in zip(STEP_TIME_PARTS, (g.mlx_s, g.own_s)):
            split.add_metric([g.model, worker, part], seconds)
    paths = CounterMetricFamily(PREFIX + "engine_requests",
                                "Requests a worker's engine finished, by path: solo (generate_step alone), batch "
                                "(BatchGenerator), handoff (solo, then moved into the batch).", labels=["model", "path"])
    steps = CounterMetricFamily(PREFIX + "engine_decode_steps", "Engine decode steps, by path: solo or batch.",
                                labels=["model", "path"])
    for model in snap.models:
        for path, n in snap.stats[model].paths.items():
            paths.add_metric([model, path], n)
        for path, n in snap.stats[model].path_steps.items():
            steps.add_metric([model, path], n)
    yield from (busy, split, paths, steps)


def _gauges(snap: Snapshot) -> Iterator[Metric]:
    if snap.broker is not None:  # only while the broker reports; a stale value would mislead
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Requests waiting in the broker for a worker.",
                                  labels=["model"])
        running = GaugeMetricFamily(PREFIX + "requests_running", "Requests dispatched to workers and not finished.",
                                    labels=["model"])
        for model in snap.models:
            g = snap.broker.get(model, {"queue_depth": 0, "running": 0})
            depth.add_metric([model], g["queue_depth"])
            running.add_metric([model], g["running"])
        yield depth
        yield running
    workers = GaugeMetricFamily(
        PREFIX + "workers", "Workers by state: idle, busy, full (registered with the broker), "
        "starting (alive, not registered), down (exited or given up).", labels=["model", "state"])
    for model in snap.models:
        states = snap.worker_states.get(model, {})
        for state in WORKER_STATES:
            workers.add_metric([model, state], states.get(state, 0))
    yield workers
    limit = GaugeMetricFamily(PREFIX + "admission_batch_limit",
                              "Most waiting requests a worker admits together (auto-tune moves it).",
                              labels=["model", "worker"])
    window = GaugeMetricFamily(PREFIX + "batch_window_seconds",
                               "The batching window a worker applies now (the adaptive policy moves it).",
                               labels=["model", "worker"])
    for worker, g in sorted(snap.workers.items()):
        limit.add_metric([g.model, worker], g.admission_batch)
        window.add_metric([g.model, worker], g.window_s)
    yield limit
    yield window


# ---- HTTP ---------------------------------------------------------------------------------


class MetricsServer(ThreadingHTTPServer):
    """The HTTP side: one private registry, the shared state and its lock."""

    daemon_threads = True

    def __init__(self, addr: tuple[str, int], state: CollectorState, lock: threading.Lock) -> None:
        self.state = state
        self.lock = lock
        self.started_s = time.monotonic()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetMetrics(self.snapshot))
        super().__init__(addr, _Handler)

    def snapshot(self) -> Snapshot:
        """A copy of the state, taken under the lock."""
        with self.lock:
            return self.state.snapshot()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(self.server.registry), content_type)
        elif path == "/health":
            with self.server.lock:
                st = self.server.state
                body = {"status": "ok", "pid": os.getpid(), "events_received": st.received,
                        "events_malformed": st.malformed, "uptime_s": round(time.monotonic() - self.server.started_s, 3)}
            self._json(200, body)
        elif path == "/ready":
            with self.server.lock:
                ready, body = self.server.state.readiness()
            self._json(200 if ready else 503, body)
        else:
            self._json(404, {"error": f"no such path {path[:100]!r}; try /metrics, /health or /ready"})

    def _json(self, code: int, body: dict[str, Any]) -> None:
        self._reply(code, json.dumps(body, sort_keys=True).encode() + b"\n", "application/json")

    def _reply(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http %s " + fmt, self.client_address[0], *args)


# ---- the actor ------------------------------------------------------------------------------


class CollectorActor:
    """Owns the PULL socket, the state and the HTTP server."""

    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()
        self.state = CollectorState(MonotonicClock(), models=[m.name for m in cfg.models],
                                    broker_stale_s=max(5.0, 3 * cfg.heartbeat_interval_s))
        self.stop_requested = False
        self.ctx = zmq.Context()
        self.pull: zmq.SyncSocket | None = None
        self.http: MetricsServer | None = None
        self._http_thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the HTTP server, then bind the PULL socket; a StartError names the setting."""
        try:
            self.http = MetricsServer((self.cfg.metrics_host, self.cfg.metrics_port), self.state, self.lock)
        except OSError as exc:
            raise StartError(f"cannot serve metrics on {self.cfg.metrics_host}:{self.cfg.metrics_port} "
                             f"({exc.strerror}); change metrics_port (--metrics-port, MLX_METRICS_PORT)") from None
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT_BYTES + 1024)  # bigger ones drop that connection
        try:
            self.pull.bind(self.cfg.metrics_events)
        except zmq.ZMQError as exc:
            raise StartError(f"cannot bind metrics_events {self.cfg.metrics_events}: {exc.strerror}") from None
        self._http_thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.2},
                                             name="metrics-http", daemon=True)
        self._http_thread.start()
        log.info("metrics on http://%s:%d/metrics; events on %s", self.cfg.metrics_host, self.http_port,
                 self.cfg.metrics_events)

    @property
    def http_port(self) -> int:
        """The port the HTTP server listens on (useful with metrics_port=0)."""
        assert self.http is not None
        return int(self.http.server_address[1])

    def request_stop(self) -> None:
        """Signal-safe: only sets a flag the loop checks."""
        self.stop_requested = True

    def run(self) -> None:
        """Receive and apply events until asked to stop."""
        assert self.pull is not None
        while not self.stop_requested:
            if not self.pull.poll(200):
                continue
            batch: list[list[bytes]] = []
            while len(batch) < 1024:
                try:
                    batch.append(self.pull.recv_multipart(flags=zmq.NOBLOCK))
                except zmq.Again:
                    break
            with self.lock:
                for frames in batch:
                    self.state.apply_frames(frames)

    def close(self) -> None:
        """Stop the HTTP server and close the socket."""
        if self.http is not None:
            if self._http_thread is not None:  # shutdown() waits for serve_forever, so only once it runs
                self.http.shutdown()
            self.http.server_close()
        if self.pull is not None:
            self.pull.close(0)
        self.ctx.term()


def run_collector(cfg: FleetConfig) -> None:
    """Process entry point (spawned by the supervisor when metrics_export is on)."""

    def hooks() -> Hooks:
        actor = CollectorActor(cfg)
        return Hooks(start=actor.start, run=actor.run, close=actor.close, request_stop=actor.request_stop)

    run_process("collector", cfg.log_level, hooks)
