"""The engine's solo fast path with real MLX, in-process: a lone request decodes through
mlx-lm's ``generate_step`` and moves into the ``BatchGenerator`` mid-stream unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.integration.reference import greedy_reference

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPTS = ["Hello", "The weather today is", "Tell me about queues and workers."]


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_events: int = 0


def make_engine(demo_model: tuple[Any, Any], solo: bool = True, entries: int = 0, **kwargs: Any) -> Any:
    from workers.engine.adapter import Engine

    kwargs.setdefault("prefill_step_size", 64)
    return Engine(*demo_model, solo_fast_path=solo, prompt_cache_entries=entries, prompt_cache_bytes=(1 << 30) if entries else 0,
                  **kwargs)


def req(key: str, ids: list[int], max_tokens: int = 24, **kwargs: Any) -> Any:
    from workers.engine.adapter import EngineRequest

    return EngineRequest(key, list(ids), max_tokens, **kwargs)


def collect(out: dict[str, Result], events: list[Any]) -> None:
    for ev in events:
        res = out.setdefault(ev.key, Result())
        res.token_ids += ev.token_ids
        res.text += ev.text
        res.first_events += ev.first_token
        if ev.finish_reason is not None:
            res.finish_reason, res.completion_tokens, res.cached_tokens = ev.finish_reason, ev.completion_tokens, ev.cached_tokens


def drain(engine: Any, out: dict[str, Result] | None = None) -> dict[str, Result]:
    out = {} if out is None else out
    for _ in range(10_000):
        if not engine.active:
            break
        collect(out, engine.step())
    assert not engine.active and engine.solo is None
    return out


def run(engine: Any, reqs: list[Any]) -> dict[str, Result]:
    engine.insert(reqs)
    return drain(engine)


def reference_text(demo_model: tuple[Any, Any], ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """In-process ``mlx_lm.stream_generate``, greedy: token ids and text."""
    return greedy_reference(*demo_model, ids, max_tokens)


def reference(demo_model: tuple[Any, Any], ids: list[int], max_tokens: int) -> list[int]:
    """In-process ``mlx_lm.stream_generate``, greedy: token ids."""
    return reference_text(demo_model, ids, max_tokens)[0]


def migrate_after(engine: Any, a: Any, b: Any, steps: int) -> dict[str, Result]:
    """Run ``a`` alone for ``steps`` steps, then insert ``b``; drain both."""
    engine.insert([a])
    assert engine.solo is not None
    out: dict[str, Result] = {}
    for _ in range(steps):
        collect(out, engine.step())
    assert engine.solo is not None and engine.active == 1
    engine.insert([b])
    assert engine.solo is None and engine.active == 2
    return drain(engine, out)


def test_a_lone_request_goes_solo_and_matches_stream_generate(demo_model):
    engine = make_engine(demo_model)
    for prompt in PROMPTS:
        ids = engine.encode_prompt(prompt, None, None)
        engine.insert([req("a", ids)])
        assert engine.solo is not None and engine.active == 1 and engine.free_slots == engine.decode_capacity - 1
        got = drain(engine)["a"]
        assert (got.token_ids, got.text) == reference_text(demo_model, ids, 24), prompt
        assert got.finish_reason == "length" and got.completion_tokens == 24 and got.first_events == 1
    s = engine.stats
    # The first solo step prefills and yields the first token: every step is a decode step of batch 1.
    assert s.steps == s.decode_steps == s.generated_tokens == s.sequences_decoded == 24 * len(PROMPTS)
    assert s.max_batch_size == s.last_batch_size == 1 and s.mean_batch_size == 1.0
    off = make_engine(demo_model, solo=False)
    off_ids = off.encode_prompt(PROMPTS[0], None, None)
    assert off.solo_fast_path is False
    off.insert([req("a", off_ids)])
    assert off.solo is None
    assert drain(off)["a"].token_ids == reference(demo_model, off_ids, 24)


@pytest.mark.parametrize("steps", [0, 1, 2, 7, 23])
def test_greedy_output_is_identical_with_a_handoff_after_any_token(demo_model, steps):
    # 0: before the first token (nothing ran yet); 1: right after it; 23 of 24: one token left.
    engine = make_engine(demo_model)
    a_ids, b_ids = (engine.encode_prompt(p, None, None) for p in PROMPTS[1:])
    got = migrate_after(engine, req("a", a_ids), req("b", b_ids, max_tokens=30), steps)
    assert (got["a"].token_ids, got["a"].text) == reference_text(demo_model, a_ids, 24)
    assert got["a"].finish_reason == "length" and got["a"].completion_tokens == 24 and got["a"].first_events == 1
    assert got["b"].token_ids == reference(demo_model, b_ids, 30)
    if steps < 23:  # with one token left, a finishes as b's prefill ends
        assert engine.stats.max_batch_size == 2


def test_seeded_sampling_is_unchanged_by_a_handoff(demo_model):
    engine, off = make_engine(demo_model), make_engine(demo_model, solo=False)
    ids = engine.encode_prompt(PROMPTS[0], None, None)
    opts = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    alone = run(engine, [req("a", ids, **opts)])["a"].token_ids
    batched = run(off, [req("a", ids, **opts)])["a"].token_ids
    moved = migrate_after(engine, req("a", ids, **opts), req("b", ids, max_tokens=4), 5)["a"].token_ids
    assert alone == batched == moved


def test_cancel_during_solo_and_after_the_handoff(demo_model):
    engine = make_engine(demo_model)
    ids = engine.encode_prompt(PROMPTS[2], None, None)
    engine.insert([req("a", ids, max_tokens=100)])
    for _ in range(3):
        assert not [e for e in engine.step() if e.finish_reason]
    assert engine.streams[engine.uids_of["a"][0]].tokens == 3
    (ev,) = engine.remove(["a"])
    assert ev.finish_reason == "cancelled" and ev.completion_tokens == 3
    assert engine.solo is None and engine.active == 0 and engine.step() == []
    # After a handoff, the cancelled one leaves the batch and the other is unaffected.
    engine.insert([req("a", ids, max_tokens=100)])
    engine.step()
    engine.insert([req("b", ids, max_tokens=20)])
    engine.step()
    engine.step()
    (ev,) = engine.remove(["a"])
    assert ev.finish_reason == "cancelled" and engine.active == 1
    assert drain(engine)["b"].token_ids == reference(demo_model, ids, 20)
    # The engine still goes solo afterwards.
    engine.insert([req("c", ids, max_tokens=5)])
    assert engine.solo is not None
    assert drain(engine)["c"].token_ids == reference(demo_model, ids, 5)


def test_a_stop_string_ends_a_solo_request(demo_model):
    engine = make_engine(demo_model, entries=8)
    ids = engine.encode_prompt(PROMPTS[0], None, None)
    base = run(engine, [req("a", ids, max_tokens=30, cache=False)])["a"]
    stop = base.text[5:8]
    assert stop.strip(), base.text
    cut = run(engine, [req("b", ids, max_tokens=30, stop=[stop])])["b"]
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.index(stop)]
    assert cut.token_ids == base.token_ids[: len(cut.token_ids)]
    # Its cache was stored, exactly as many tokens as its key, like a batched sequence's.
    ((key, entry),) = engine.prompt_cache._entries.items()
    assert len(key) == len(ids) + cut.completion_tokens and key[: len(ids)] == tuple(ids)
    assert all(c.keys.shape[2] == c.offset == len(key) for c in entry.kv)


def test_a_prompt_cache_hit_then_solo(demo_model):
    on, off = make_engine(demo_model, entries=8), make_engine(demo_model, solo=False)
    system = "You are the fleet's helpful assistant, and you answer in short sentences. " * 3
    first = on.encode_prompt(None, [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}], None)
    turn1 = run(on, [req("a", first)])["a"]
    assert turn1.cached_tokens == 0 and on.cache_stats.stored == 1
    follow = on.encode_prompt(None, [{"role": "system", "content": system}, {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": demo_model[1].decode(turn1.token_ids)},
                                     {"role": "user", "content": "And then?"}], None)
    on.insert([req("b", follow)])
    assert on.solo is not None
    got = drain(on)["b"]
    assert got.cached_tokens > len(first) // 2 and on.cache_stats.hits == 1
    assert got.token_ids == run(off, [req("x", follow)])["x"].token_ids == reference(demo_model, follow, 24)
    # A hit that is handed off mid-stream is still right.
    on.insert([req("c", follow)])
    moved: dict[str, Result] = {}
    collect(moved, on.step())
    on.insert([req("d", first, max_tokens=6)])
    drain(on, moved)
    assert moved["c"].cached_tokens == len(follow) - 1 and moved["c"].token_ids == got.token_ids
    assert moved["d"].token_ids == turn1.token_ids[:6]
    assert all(entry.kv[0].size() == len(key) for key, entry in on.prompt_cache._entries.items())


def test_two_requests_inserted_together_go_straight_to_the_batch(demo_model):
    engine = make_engine(demo_model)
    a, b = (engine.encode_prompt(p, None, None) for p in PROMPTS[:2])
    engine.insert([req("a", a), req("b", b)])
    assert engine.solo is None and engine.active == 2
    got = drain(engine)
    assert got["a"].token_ids == reference(demo_model, a, 24) and got["b"].token_ids == reference(demo_model, b, 24)
    assert engine.stats.max_batch_size == 2


class _EosAs:
    """A tokenizer whose EOS is a token the demo model really produces (it seldom ends on its own)."""

    def __init__(self, tokenizer: Any, eos: int) -> None:
        self._tok, self.eos_token_ids = tokenizer, [eos]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


@pytest.mark.parametrize("handoff", [False, True])
def test_eos_ends_a_solo_request_as_it_ends_a_batched_one(demo_model, handoff):
    model, tokenizer = demo_model
    ids = tokenizer.encode(PROMPTS[1])
    want = reference(demo_model, ids, 24)
    eos = next(t for t in want[3:] if t not in want[:3])  # after the handoff at 2
    fake = (model, _EosAs(tokenizer, eos))
    on, off = make_engine(fake), make_engine(fake, solo=False)
    if handoff:
        got = migrate_after(on, req("a", ids), req("b", ids, max_tokens=3), 2)["a"]
    else:
        got = run(on, [req("a", ids)])["a"]
    batched = run(off, [req("a", ids)])["a"]
    assert got == batched
    assert got.finish_reason == "stop" and got.token_ids == want[: want.index(eos)]
    assert got.completion_tokens == want.index(eos) + 1  # the EOS counts, it is not shown


def test_set_admission_batch_and_close_with_a_solo_running(demo_model):
    engine = make_engine(demo_model)
    ids = engine.encode_prompt(PROMPTS[0], None, None)
    engine.insert([req("a", ids)])
    engine.step()
    engine.set_admission_batch(3)
    assert engine.gen.prefill_batch_size == 3
    engine.close()
    assert engine.solo is None
