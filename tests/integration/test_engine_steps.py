"""The engine's steps with real MLX, in-process: no synchronisation of its own between steps,
one sampler object per unseeded setting, and each request's path and the time split counted."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_solo import PROMPTS, drain, make_engine, req, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WORKERS = str(Path(__file__).resolve().parents[2] / "workers")
SYNCS = ("eval", "item", "tolist", "synchronize")  # each waits for everything queued before it


class SyncCounter:
    """Counts MLX evaluation calls made from Python, by kind and by caller: our engine or mlx-lm."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            self.calls[(name, "ours" if caller.startswith(WORKERS) else "mlx_lm")] += 1
            return fn(*args, **kwargs)

        return counted

    def count(self, *names: str, who: str | None = None) -> int:
        return sum(n for (name, w), n in self.calls.items() if name in names and who in (None, w))


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncCounter]:
    import mlx.core as mx

    counter = SyncCounter()
    for name in ("eval", "async_eval", "synchronize"):
        monkeypatch.setattr(mx, name, counter.wrap(name, getattr(mx, name)))
    for name in ("item", "tolist"):
        monkeypatch.setattr(mx.array, name, counter.wrap(name, getattr(mx.array, name)))
    yield counter


def bare_batch_steps(demo_model: tuple[Any, Any], prompts: list[list[int]], max_tokens: list[int]) -> int:
    """Steps mlx-lm's own ``BatchGenerator`` (the engine's settings) takes to finish ``prompts``."""
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = demo_model
    gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(set(tokenizer.eos_token_ids))],
                         completion_batch_size=16, prefill_batch_size=8, prefill_step_size=64)
    gen.insert(prompts, max_tokens=max_tokens)
    steps, live = 0, len(prompts)
    while live:
        _, responses = gen.next()
        live -= sum(r.finish_reason is not None for r in responses)
        steps += 1
    gen.close()
    return steps


def test_batched_steps_add_no_synchronisation_to_mlx_lms(demo_model, syncs):
    engine = make_engine(demo_model, entries=8)  # the prompt cache stores every finished sequence
    prompts = [engine.encode_prompt(p, None, None) for p in PROMPTS]
    lengths = [9, 14, 20]  # finishing at different steps: three filters of the batch
    engine.insert([req(str(i), ids, max_tokens=n) for i, (ids, n) in enumerate(zip(prompts, lengths))])
    syncs.calls.clear()
    out = drain(engine)
    assert {k: v.completion_tokens for k, v in out.items()} == {"0": 9, "1": 14, "2": 20}
    assert engine.cache_stats.stored == 3
    # Our code waits for nothing: the finished caches are stored with async_eval only.
    assert syncs.count(*SYNCS, who="ours") == 0, syncs.calls
    assert syncs.count("async_eval", who="ours") == 3
    engine_waits = syncs.count(*SYNCS)
    # mlx-lm alone, over the same sequences, takes as many steps and waits as often.
    syncs.calls.clear()
    assert bare_batch_steps(demo_model, prompts, lengths) == engine.stats.steps
    assert syncs.count(*SYNCS) == engine_waits


def test_admitting_a_prompt_cache_hit_mid_batch_waits_for_nothing(demo_model, syncs):
    engine = make_engine(demo_model, entries=8)
    ids = engine.encode_prompt(PROMPTS[2], None, None)
    run(engine, [req("a", ids, max_tokens=6)])
    engine.insert([req("b", ids + [5, 6], max_tokens=30), req("c", ids, max_tokens=30)])
    for _ in range(4):
        engine.step()
    syncs.calls.clear()
    hits = engine.cache_stats.hits
    engine.insert([req("d", ids + [7], max_tokens=10)])  # a hit on a's stored cache, while b and c decode
    assert engine.cache_stats.hits == hits + 1
    assert syncs.count(*SYNCS, "async_eval") == 0, syncs.calls  # the copy of the hit stays lazy
    engine.step()
    assert syncs.count(*SYNCS, who="ours") == 0, syncs.calls
    drain(engine)


def test_solo_steps_add_no_synchronisation_to_generate_steps(demo_model, syncs):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    engine = make_engine(demo_model, entries=8)
    ids = engine.encode_prompt(PROMPTS[1], None, None)
    syncs.calls.clear()
    got = run(engine, [req("a", ids, max_tokens=12)])["a"]
    assert got.completion_tokens == 12 and engine.stats.solo_steps == 12
    assert syncs.count(*SYNCS, who="ours") == 0, syncs.calls
    engine_waits = syncs.count(*SYNCS)
    syncs.calls.clear()
    gen = generate_step(mx.array(ids), demo_model[0], max_tokens=12, prefill_step_size=64)
    tokens = [next(gen)[0] for _ in range(12)]
    gen.close()
    assert tokens == got.token_ids
    assert syncs.count(*SYNCS) == engine_waits


def test_each_request_reports_its_path_and_the_stats_count_them(demo_model):
    engine = make_engine(demo_model)
    a, b = (engine.encode_prompt(p, None, None) for p in PROMPTS[:2])
    finals: dict[str, str] = {}
    engine.insert([req("solo", a, max_tokens=5)])
    while engine.active:
        finals.update({e.key: e.path for e in engine.step() if e.finish_reason})
    engine.insert([req("moved", a, max_tokens=8)])
    engine.step()
    engine.insert([req("batched", b, max_tokens=4)])
    while engine.active:
        finals.update({e.key: e.path for e in engine.step() if e.finish_reason})
    engine.insert([req("x", a, max_tokens=50), req("y", b, max_tokens=50)])
    engine.step()
    finals.update({e.key: e.path for e in engine.remove(["x", "y"])})
    assert finals == {"solo": "solo", "moved": "handoff", "batched": "batch", "x": "batch", "y": "batch"}
    s = engine.stats
    assert s.requests == {"solo": 1, "batch": 3, "handoff": 1} and s.handoffs == 1
    assert s.solo_steps == 5 + 1  # "moved" decoded one token alone before the handoff
    assert s.solo_steps + s.batch_steps == s.decode_steps


def test_the_time_split_covers_the_busy_time(demo_model):
    engine = make_engine(demo_model)
    prompts = [engine.encode_prompt(p, None, None) for p in PROMPTS]
    run(engine, [req(str(i), ids, max_tokens=16) for i, ids in enumerate(prompts)])
    s = engine.stats
    assert not engine.timing.busy and s.cycles >= s.steps
    # The steps themselves are part of the split, and mlx-lm's share dominates on a tiny model too.
    assert s.mlx_s + s.own_s >= s.busy_s * 0.99
    assert s.mlx_s > s.own_s > 0.0


def test_unseeded_requests_share_a_sampler_and_seeded_ones_stay_reproducible(demo_model):
    from workers.engine.sampling import SamplerPool, SeededSampler

    pool = SamplerPool(max_shared=2)
    warm = pool.get(0.8, 0.9, 0, None)
    assert pool.get(0.8, 0.9, 0, None) is warm and pool.get(0.8, 0.95, 0, None) is not warm
    assert pool.get(0.0, 0.5, 3, 7) is pool.get(0.0, 1.0, 0, None)  # greedy is greedy, seed or not
    assert isinstance(pool.get(0.8, 0.9, 0, 1), SeededSampler) and pool.get(0.8, 0.9, 0, 1) is not pool.get(0.8, 0.9, 0, 1)
    pool.get(0.5, 1.0, 0, None)  # a third setting: the pool starts over
    assert pool.get(0.8, 0.9, 0, None) is not warm
    engine, alone = make_engine(demo_model, solo=False), make_engine(demo_model, solo=False)
    ids = engine.encode_prompt(PROMPTS[0], None, None)
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 11}
    want = run(alone, [req("s", ids, **seeded)])["s"].token_ids
    shared = {"temperature": 0.7, "top_p": 0.9}
    got = run(engine, [req("u1", ids, **shared), req("s", ids, **seeded), req("u2", ids, **shared)])
    assert got["s"].token_ids == want
    assert len(got["u1"].token_ids) == len(got["u2"].token_ids) == 24
