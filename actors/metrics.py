"""Metric events: the schema the broker, workers and supervisor send to the collector.

An event is one ZeroMQ multipart message of two frames: ``EVENT_TAG`` and one
msgpack map with ``type``, ``source`` (who sent it) and ``dropped`` (how many
events that sender has dropped since it started). The four types:

- ``step`` (worker, at most every ``flush_interval_s``): the batch size of every
  engine step since the last event, their summed duration, the admission waits
  of every batch admitted, fast-path admissions since the last event, and the
  admission batch limit and window now in force; and, since the last event, the
  requests the engine finished by path (``ENGINE_PATHS``), its decode steps by
  path (``DECODE_PATHS``), and its busy time split into seconds inside mlx-lm
  (``mlx_s``) and its own (``own_s``).
- ``request`` (worker, one per finished request): times (queue, TTFT, end to
  end), token counts, finish reason, and the inter-token latencies already
  binned into ``ITL_BUCKETS_S`` so the collector's histogram stays exact.
- ``broker`` (about 1 Hz): per model queue depth, running requests, each
  registered worker's state, and cumulative counts of replies by finish reason
  and error code, of prompt and generation tokens, of requests routed by reason
  (``ROUTE_REASONS``), and the bucket counts (``PREFIX_BLOCK_BUCKETS``) and sum of the
  prefix blocks held where requests were routed by prefix.
- ``supervisor`` (on change, and every few seconds): each local worker child's
  restarts and liveness.

Senders never block: :class:`EventSender` uses a PUSH socket with a small
send queue, does not queue for a collector that is not connected, and drops
(and counts) what does not fit. Decoding is bounded and strict; anything else
raises :class:`EventError`, which the collector counts and drops.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import zmq

from actors.protocol import ERROR_CODES, FINISH_REASONS
from actors.sockets import local_addr

EVENT_TAG = b"MLXF1-EV"
MAX_EVENT_BYTES = 256 * 1024
MAX_EVENT_ITEMS = 4096  # longest list or map inside an event
MAX_LABEL_CHARS = 256
# Events a sender queues for a slow collector before it starts dropping them.
EVENT_SNDHWM = 512

# Histogram buckets (upper bounds; +Inf is implied). Changing one is a schema
# change: ``request`` events carry counts aligned to ITL_BUCKETS_S.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0)
# Prefix blocks (actors/prefix_keys.py) a request's replica held when the broker routed it there by prefix.
PREFIX_BLOCK_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
# Why the broker sent a request where it did (broker/routing.py).
ROUTE_REASONS = ("affinity", "prefix", "least_loaded", "imbalance")
WINDOW_WAIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05,
                         0.1, 0.25, 1.0)

# How a worker's engine decoded a request: generate_step alone, the BatchGenerator, or
# alone first and then moved into the batch. Decode steps are made by the first two.
ENGINE_PATHS = ("solo", "batch", "handoff")
DECODE_PATHS = ("solo", "batch")
# The two parts of an engine's busy time: inside mlx-lm, and the worker's own code around it.
STEP_TIME_PARTS = ("mlx_lm", "own")

# Worker states: the first three are registered with the broker (ready for work
# unless full); the collector derives the last two from the supervisor's view.
REGISTERED_STATES = ("idle", "busy", "full")
WORKER_STATES = (*REGISTERED_STATES, "starting", "down")
# Label values outside the known sets are counted under "other", never as given.
OTHER = "other"
KNOWN_FINISH_REASONS = tuple(sorted(FINISH_REASONS))
KNOWN_ERROR_CODES = tuple(sorted(ERROR_CODES))


class EventError(ValueError):
    """An event that cannot be accepted (wrong tag, too big, wrong shape)."""


def bucket_index(bounds: Sequence[float], value: float) -> int:
    """The bucket a value falls in: the first bound >= value, or len(bounds) for +Inf."""
    return bisect.bisect_left(bounds, value)


def bucket_counts(values: Sequence[float], bounds: Sequence[float]) -> list[int]:
    """Non-cumulative counts of ``values`` per bucket of ``bounds`` (+Inf last)."""
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1
    return counts


# ---- encoding and strict decoding ---------------------------------------------------


def encode_event(event: dict[str, Any]) -> list[bytes]:
    """The two frames of an event map."""
    return [EVENT_TAG, msgpack.packb(event, use_bin_type=True)]


Check = Callable[[Any], bool]


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1e9


def _label(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_LABEL_CHARS


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _list_of(check: Check) -> Check:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _map_of(check: Check) -> Check:
    return lambda v: isinstance(v, dict) and all(_label(k) and check(x) for k, x in v.items())


def _record(fields: dict[str, Check], optional: frozenset[str] = frozenset()) -> Check:
    return lambda v: isinstance(v, dict) and _fields_ok(v, fields, optional)


def _fields_ok(obj: dict[str, Any], fields: dict[str, Check], optional: frozenset[str]) -> bool:
    if any(k not in fields for k in obj):
        return False
    return all((k in obj and check(obj[k])) or (k not in obj and k in optional) for k, check in fields.items())


_ITL_COUNTS = len(ITL_BUCKETS_S) + 1
_COMMON: dict[str, Check] = {"type": _label, "source": _label, "dropped": _count}
_MODEL_SNAPSHOT = _record({
    "queue_depth": _count, "running": _count, "workers": _map_of(lambda s: s in REGISTERED_STATES),
    "requests": _map_of(_count), "errors": _map_of(_count), "prompt_tokens": _count, "generation_tokens": _count,
    "routed": _map_of(_count),
    "prefix_blocks": lambda v: _list_of(_count)(v) and len(v) == len(PREFIX_BLOCK_BUCKETS) + 1,
    "prefix_blocks_sum": _count,
}, frozenset({"routed", "prefix_blocks", "prefix_blocks_sum"}))
_SUPERVISED_WORKER = _record({"worker": _label, "model": _label, "restarts": _count, "alive": _flag,
                              "gave_up": _flag})
EVENT_FIELDS: dict[str, tuple[dict[str, Check], frozenset[str]]] = {
    "step": ({**_COMMON, "model": _label, "worker": _label, "batch_sizes": _list_of(_count), "steps": _count,
              "busy_s": _seconds, "window_wait_s": _list_of(_seconds), "fast_path_admissions": _count,
              "admission_batch": _count, "window_s": _seconds, "paths": _map_of(_count),
              "path_steps": _map_of(_count), "mlx_s": _seconds, "own_s": _seconds},
             frozenset({"paths", "path_steps", "mlx_s", "own_s"})),
    "request": ({**_COMMON, "model": _label, "worker": _label, "finish_reason": _label, "prompt_tokens": _count,
                 "completion_tokens": _count, "queue_s": _seconds, "ttft_s": _seconds, "e2e_s": _seconds,
                 "itl_counts": lambda v: _list_of(_count)(v) and len(v) == _ITL_COUNTS, "itl_sum_s": _seconds},
                frozenset({"queue_s", "ttft_s"})),
    "broker": ({**_COMMON, "models": _map_of(_MODEL_SNAPSHOT)}, frozenset()),
    "supervisor": ({**_COMMON, "workers": _list_of(_SUPERVISED_WORKER)}, frozenset()),
}


def decode_event(frames: list[bytes]) -> dict[str, Any]:
    """Check tag, size and shape of one event; return its map. Raises EventError."""
    if len(frames) != 2:
        raise EventError(f"expected 2 frames (tag, payload), got {len(frames)}")
    tag, payload = frames
    if tag != EVENT_TAG:
        raise EventError("unknown event tag")
    if len(payload) > MAX_EVENT_BYTES:
        raise EventError(f"event of {len(payload)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_str_len=MAX_EVENT_BYTES,
                              max_bin_len=0, max_array_len=MAX_EVENT_ITEMS, max_map_len=MAX_EVENT_ITEMS,
                              max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EventError(f"payload is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise EventError("payload must be a map")
    spec = EVENT_FIELDS.get(obj.get("type"))  # type: ignore[arg-type]
    if spec is None:
        raise EventError(f"unknown event type {str(obj.get('type'))[:64]!r}")
    if not _fields_ok(obj, *spec):
        raise EventError(f"{obj['type']}: missing, unknown or ill-typed fields")
    return obj


# ---- sending --------------------------------------------------------------------------


class EventSender:
    """Sends events to the collector without ever blocking the caller.

    One PUSH socket connected to ``addr``. ``ZMQ_IMMEDIATE`` keeps events from
    queueing while no collector is connected, and the send queue holds at most
    ``hwm`` events for a slow one. Whatever does not fit is dropped and counted
    in ``dropped``, which every later event carries. Not thread-safe: one
    sender per thread, like any ZeroMQ socket.
    """

    enabled = True

    def __init__(self, addr: str, source: str, *, ctx: zmq.SyncContext | None = None, hwm: int = EVENT_SNDHWM) -> None:
        self.source = source
        self.dropped = 0
        self.sent = 0
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(addr)

    def send(self, kind: str, fields: dict[str, Any]) -> bool:
        """Send one event of type ``kind``; False (and counted) when it had to be dropped."""
        fields["type"] = kind
        fields["source"] = self.source
        fields["dropped"] = self.dropped
        try:
            self._sock.send_multipart(encode_event(fields), flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # EAGAIN: no collector, or its queue is full
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        """Close the socket (linger 0), and the context if this sender made it."""
        self._sock.close(0)
        if self._own_ctx:
            self._ctx.term()


class NullSender:
    """The sender used when metrics are off: sends nothing, costs nothing."""

    enabled = False
    source = ""
    dropped = 0
    sent = 0

    def send(self, kind: str, fields: dict[str, Any]) -> bool:
        """Discard the event."""
        return False

    def close(self) -> None:
        """Nothing to close."""


def make_event_sender(addr: str | None, source: str, *, ctx: zmq.SyncContext | None = None) -> EventSender | NullSender:
    """An EventSender to ``addr``, or a NullSender when ``addr`` is None or empty."""
    if not addr:
        return NullSender()
    return EventSender(addr, source, ctx=ctx)


def events_addr(metrics_export: bool, metrics_events: str) -> str | None:
    """Where a local process sends events: the configured endpoint, or None when metrics are off."""
    if not metrics_export:
        return None
    return local_addr(metrics_events)
