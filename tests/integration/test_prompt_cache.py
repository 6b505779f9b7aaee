"""The prompt cache with real MLX: the engine in-process, then a 2-replica fleet with affinity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from actors.config import BatchingConfig
from mlx_fleet.client import Client
from tests.integration.fleets import start_fleet
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SYSTEM = ("You are the fleet's helpful assistant. You answer questions about brokers, workers, "
          "queues and batching in short, plain sentences, and you never make things up. ") * 3
QUESTIONS = ["What does the broker do?", "And a worker?", "Why batch requests?", "How are queues kept fair?"]


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0


def make_engine(mt: tuple[Any, Any], entries: int = 16, nbytes: int = 1 << 30, **kwargs: Any) -> Any:
    from workers.engine.adapter import Engine

    return Engine(*mt, prompt_cache_entries=entries, prompt_cache_bytes=nbytes, prefill_step_size=64, **kwargs)


def req(key: str, ids: list[int], max_tokens: int = 16, **kwargs: Any) -> Any:
    from workers.engine.adapter import EngineRequest

    return EngineRequest(key, list(ids), max_tokens, **kwargs)


def drain(engine: Any, reqs: list[Any]) -> dict[str, Result]:
    """Insert ``reqs`` together and step until all finish."""
    engine.insert(reqs)
    out = {r.key: Result() for r in reqs}
    for _ in range(10_000):
        if not engine.active:
            break
        for ev in engine.step():
            res = out[ev.key]
            res.token_ids += ev.token_ids
            if ev.finish_reason is not None:
                res.finish_reason, res.cached_tokens = ev.finish_reason, ev.cached_tokens
    assert not engine.active
    return out


def chat_ids(engine: Any, turns: list[str], replies: list[str]) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(turns):
        messages.append({"role": "user", "content": question})
        if i < len(replies):
            messages.append({"role": "assistant", "content": replies[i]})
    return engine.encode_prompt(None, messages, None)


def entries_are_whole(engine: Any) -> bool:
    """Every entry holds exactly as many tokens of KV as its key has."""
    return all(entry.kv[0].size() == len(key) for key, entry in engine.prompt_cache._entries.items())


def test_greedy_output_is_identical_with_and_without_the_cache(demo_model):
    on, off = make_engine(demo_model), make_engine(demo_model, entries=0)
    replies: list[str] = []
    for turn in range(len(QUESTIONS)):
        ids = chat_ids(on, QUESTIONS[: turn + 1], replies)
        got, want = drain(on, [req("a", ids)])["a"], drain(off, [req("b", ids)])["b"]
        assert got.token_ids == want.token_ids, f"turn {turn}"
        assert got.cached_tokens == 0 if turn == 0 else got.cached_tokens > len(ids) // 2
        replies.append(on.tokenizer.decode(got.token_ids))
    # The same prompt again reuses all but its last token; a stop string's cache is kept too.
    again = drain(on, [req("c", ids, stop=[replies[-1][3:6] or "x"])])["c"]
    assert again.cached_tokens == len(ids) - 1
    assert again.token_ids == want.token_ids[: len(again.token_ids)]
    assert on.cache_stats.hits == len(QUESTIONS) and on.cache_stats.misses == 1
    assert on.cache_stats.bytes_held > 0 and off.cache_stats.bytes_held == 0
    assert entries_are_whole(on)


def snapshot(engine: Any) -> dict[tuple[int, ...], list[Any]]:
    import mlx.core as mx

    return {k: [mx.array(c.keys) for c in e.kv] for k, e in engine.prompt_cache._entries.items()}


def same(a: dict[tuple[int, ...], list[Any]], b: dict[tuple[int, ...], list[Any]]) -> bool:
    import mlx.core as mx

    return a.keys() == b.keys() and all(
        len(x) == len(y) and all(mx.array_equal(p, q).item() for p, q in zip(x, y)) for x, y in ((a[k], b[k]) for k in a))


def test_a_cancelled_request_leaves_no_entry_and_does_not_touch_the_one_it_used(demo_model):
    on, off = make_engine(demo_model), make_engine(demo_model, entries=0)
    first = chat_ids(on, QUESTIONS[:1], [])
    drain(on, [req("warm", first)])
    before = snapshot(on)
    follow = chat_ids(on, QUESTIONS[:2], ["The broker routes requests."])
    # Cancel mid-decode (the private copy of the entry has grown), mid-prefill, and before any step.
    for steps in (6, 1, 0):
        on.insert([req("x", follow, max_tokens=40)])
        for _ in range(steps):
            assert not [e for e in on.step() if e.finish_reason]
        (event,) = on.remove(["x"])
        assert event.finish_reason == "cancelled" and not on.active
        assert same(before, snapshot(on)), f"cancelled after {steps} steps changed the cache"
    got = drain(on, [req("y", follow)])["y"]
    assert got.cached_tokens > 0
    assert got.token_ids == drain(off, [req("z", follow)])["z"].token_ids
    assert entries_are_whole(on)


def test_two_concurrent_requests_with_the_same_prefix_are_both_correct(demo_model):
    on, off = make_engine(demo_model), make_engine(demo_model, entries=0)

    def want(ids: list[int]) -> list[int]:
        return drain(off, [req("w", ids)])["w"].token_ids

    a, b = chat_ids(on, ["Tell me about brokers."], []), chat_ids(on, ["Tell me about workers."], [])
    # Cold: both miss and prefill the shared system prompt side by side.
    cold = drain(on, [req("a", a), req("b", b)])
    assert cold["a"].token_ids == want(a) and cold["b"].token_ids == want(b)
    assert cold["a"].cached_tokens == cold["b"].cached_tokens == 0
    # Warm: two follow-ups of conversation a copy the same entry at once; a third opts out.
    reply = on.tokenizer.decode(cold["a"].token_ids)
    a2, a3 = (chat_ids(on, ["Tell me about brokers.", q], [reply]) for q in ("And a worker?", "Why batch?"))
    warm = drain(on, [req("a2", a2), req("a3", a3), req("c", a2, cache=False)])
    assert warm["a2"].token_ids == want(a2) and warm["a3"].token_ids == want(a3)
    assert warm["a2"].cached_tokens == warm["a3"].cached_tokens >= len(a)
    assert warm["c"].cached_tokens == 0 and warm["c"].token_ids == warm["a2"].token_ids
    assert on.cache_stats.bypassed == 1 and entries_are_whole(on)


def test_eviction_keeps_both_bounds_with_real_caches(demo_model):
    probe = make_engine(demo_model)
    prompts = [probe.encode_prompt(f"Request number {i} asks about queue number {i * 7}.", None, None) for i in range(4)]
    drain(probe, [req("p", prompts[0], max_tokens=8)])
    one_entry = probe.cache_stats.bytes_held
    by_count = make_engine(demo_model, entries=2)
    by_bytes = make_engine(demo_model, nbytes=int(one_entry * 1.5))
    for engine in (by_count, by_bytes):
        for i, ids in enumerate(prompts):
            drain(engine, [req(str(i), ids, max_tokens=8)])
            assert engine.cache_stats.bytes_held <= engine.prompt_cache.max_bytes
            assert len(engine.prompt_cache) <= engine.prompt_cache.max_entries
            assert engine.cache_stats.bytes_held == sum(e.nbytes for e in engine.prompt_cache._entries.values())
    assert len(by_count.prompt_cache) == 2 and by_count.cache_stats.evicted == 2
    assert len(by_bytes.prompt_cache) == 1 and by_bytes.cache_stats.evicted == 3
    assert by_bytes.prompt_cache.keys()[0][: len(prompts[3])] == tuple(prompts[3])  # the newest stays


# ---- a fleet of 2 replicas ----------------------------------------------------------


@pytest.fixture(scope="module")
def fleet():
    f = start_fleet(models=(("demo", "demo", 2),), batching=BatchingConfig(prompt_cache_entries=16),
                    heartbeat_interval_s=0.2)
    yield f
    f.stop()


def converse(client: Client, tag: str, turns: int, **options: Any) -> list[Any]:
    """A multi-turn chat; each turn resends the conversation so far."""
    messages = [{"role": "system", "content": f"Conversation {tag}. {SYSTEM}"}]
    done = []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        reply = client.generate(model="demo", messages=messages, max_tokens=12, **options)
        messages.append({"role": "assistant", "content": reply.text})
        done.append(reply)
    return done


def test_affinity_and_cache_aware_routing_get_a_cache_hit_on_every_warm_turn(fleet):
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        bound = converse(client, "bound", 4, affinity="conversation-1")
        # Without a key, the broker sends each turn where the conversation so far is cached (README,
        # Routing); with least-loaded routing idle replicas would take turns and miss.
        loose = converse(client, "loose", 4)
    assert bound[0].usage["cached_tokens"] == 0
    for reply in bound[1:] + loose[1:]:
        assert reply.usage["cached_tokens"] > reply.usage["prompt_tokens"] // 2, reply.usage


def test_usage_opt_out_and_heartbeat_stats(fleet):
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        plain = converse(client, "opt-out", 2, affinity="conversation-2", cache=False)
        assert [r.usage["cached_tokens"] for r in plain] == [0, 0]
        assert converse(client, "stats", 2, affinity="conversation-3")[1].usage["cached_tokens"] > 0

        def bypassed_twice() -> list[dict[str, Any]] | None:  # heartbeats carry the counters every 0.2 s
            workers = client.status()["models"]["demo"]["workers"]
            return workers if sum(w["stats"].get("prompt_cache_bypassed", 0) for w in workers) >= 2 else None

        workers = wait_for(bypassed_twice, 20, "two bypassed lookups in the heartbeat stats")
        stats = [w["stats"] for w in workers]
    assert len(workers) == 2
    assert sum(s["prompt_cache_bypassed"] for s in stats) >= 2
    assert sum(s["prompt_cache_hits"] for s in stats) >= 1
    assert all(0 < s["prompt_cache_bytes_held"] for s in stats if s["prompt_cache_stored"])
    assert all(w["info"]["prompt_cache_max_entries"] == 16 for w in workers)
