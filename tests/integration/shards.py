"""A sharded test fleet (demo-small over two ranks), raw streams through it, and the fixtures its tests share:
``mt`` (the unsharded model in process, the reference) and ``one_blas_thread`` (import both into a test module)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from actors.config import BatchingConfig
from mlx_fleet.embedded import BackgroundFleet
from tests.integration.clients import RawClient
from tests.integration.fleets import make_config
from tests.integration.reference import greedy_reference

MODEL = "demo-small"
PROMPTS = ["Once upon a time", "The weather today is", "Tell me about queues and workers.", "Hello"]


@pytest.fixture(scope="module")
def mt() -> tuple[Any, Any]:
    """The unsharded demo-small, in-process: the reference."""
    from workers.models.demo_model import ensure_demo_model
    from workers.models.precision import load_model

    return load_model(str(ensure_demo_model(MODEL)))


@pytest.fixture(autouse=True)
def one_blas_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several processes on two cores: spinning BLAS threads would starve each other."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def sharded_fleet(**overrides: Any) -> BackgroundFleet:
    """A started fleet serving MODEL as ``s``: one replica of 2 ranks, short heartbeats, quick restarts."""
    cfg, ipc_dir = make_config(models=(("s", MODEL, 1),), batching=BatchingConfig(prefill_step_size=64),
                               heartbeat_interval_s=0.25, heartbeat_liveness=8, restart_backoff_s=0.2, **overrides)
    cfg = dataclasses.replace(cfg, models=tuple(dataclasses.replace(m, shards=2) for m in cfg.models))
    return BackgroundFleet(cfg, ipc_dir).start()


def gen(rid: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """A streamed generate of model ``s`` by prompt token ids."""
    return {"type": "generate", "request_id": rid, "model": "s", "prompt_tokens": ids, "max_tokens": max_tokens,
            "stream": True}


def stream_all(raw: RawClient, reqs: dict[str, list[int]], max_tokens: int, *, cancel: str | None = None,
               cancel_after: int = 3) -> tuple[dict[str, list[int]], dict[str, dict[str, Any]]]:
    """Send every request at once; their streamed token ids and terminal replies."""
    ids: dict[str, list[int]] = {rid: [] for rid in reqs}
    ends: dict[str, dict[str, Any]] = {}
    for rid, prompt in reqs.items():
        raw.send(gen(rid, prompt, max_tokens))
    deadline = time.monotonic() + 120
    while len(ends) < len(reqs):
        assert time.monotonic() < deadline, f"no reply for {set(reqs) - set(ends)}"
        msg = raw.recv(1.0)
        if msg is None or msg.get("request_id") not in reqs:
            continue
        rid = msg["request_id"]
        if msg["type"] == "chunk":
            ids[rid] += msg["token_ids"]
            if rid == cancel and len(ids[rid]) >= cancel_after:
                raw.send({"type": "cancel", "request_id": rid})
                cancel = None
        else:
            assert rid not in ends, f"{rid}: a second terminal reply {msg}"
            ends[rid] = msg
    return ids, ends


def prompts_and_references(mt: tuple[Any, Any], prefix: str, max_tokens: int) -> tuple[dict[str, list[int]],
                                                                                      dict[str, list[int]]]:
    """PROMPTS as token ids under ids ``<prefix><i>``, and in-process mlx_lm's greedy tokens for each."""
    prompts = {f"{prefix}{i}": mt[1].encode(p) for i, p in enumerate(PROMPTS)}
    return prompts, {rid: greedy_reference(*mt, ids, max_tokens)[0] for rid, ids in prompts.items()}
