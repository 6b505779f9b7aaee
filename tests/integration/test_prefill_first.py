"""Prefill first, with real MLX, in-process: while prompts wait, the decoding sequences pause for
their prefill (up to ``prefill_first_tokens``), a new group's first tokens come in the step that
completes its prefill, and nobody's tokens change."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.test_controls import by_index, controls, ids_of
from tests.integration.test_solo import make_engine, req

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LONG = "Tell me about queues and workers, and how a broker hands requests to replicas that decode them"


def start_a(engine: Any, demo_model: tuple[Any, Any]) -> None:
    """Insert ``a`` and step until its first token: from then on it decodes."""
    engine.insert([req("a", ids_of(demo_model, "Hello"), 40)])
    while not any(e.first_token for e in engine.step()):
        pass


def staggered(engine: Any, demo_model: tuple[Any, Any], late: list[Any]) -> list[list[tuple[str, bool]]]:
    """``a`` decodes alone until its first token, then ``late`` arrive; each step's (key, first token) events."""
    start_a(engine, demo_model)
    steps: list[list[tuple[str, bool]]] = []
    engine.insert(late)
    for _ in range(10_000):
        if not engine.active:
            break
        steps.append([(e.key, e.first_token) for e in engine.step()])
    assert not engine.active
    return steps


def late_requests(demo_model: tuple[Any, Any]) -> list[Any]:
    return [req("b", ids_of(demo_model, LONG), 12), req("c", ids_of(demo_model, LONG + " today"), 12)]


def first_step(steps: list[list[tuple[str, bool]]], key: str) -> int:
    return next(i for i, events in enumerate(steps) if (key, True) in events)


def test_decoding_pauses_for_waiting_prompts_and_their_first_tokens_come_at_once(demo_model):
    # A prefill chunk of 8 tokens: the late prompts (about 20 tokens) take several steps.
    engine = make_engine(demo_model, solo=False, prefill_step_size=8, prefill_first_tokens=2048)
    steps = staggered(engine, demo_model, late_requests(demo_model))
    first = first_step(steps, "b")
    assert first == first_step(steps, "c") and first >= 2  # prefilled together, over several chunks
    assert all(key != "a" for events in steps[: first + 1] for key, _ in events)  # a paused, a step per chunk saved
    assert "a" in {key for key, _ in steps[first + 1]}  # then everyone decodes together

    mlx_lm_way = make_engine(demo_model, solo=False, prefill_step_size=8)
    steps = staggered(mlx_lm_way, demo_model, late_requests(demo_model))
    first = first_step(steps, "b")
    assert all("a" in {key for key, _ in events} for events in steps[:first])  # a decoded in every chunk's step


def test_the_pause_ends_after_prefill_first_tokens(demo_model):
    engine = make_engine(demo_model, solo=False, prefill_step_size=8, prefill_first_tokens=8)
    steps = staggered(engine, demo_model, late_requests(demo_model))
    first = first_step(steps, "b")
    assert [key for key, _ in steps[0]] == []  # one chunk (2 x 8 tokens) with a paused ...
    assert all("a" in {key for key, _ in events} for events in steps[1:first])  # ... then mlx-lm's steps
    # No prompt waits any more, so the next arrivals may pause decoding again.
    start_a(engine, demo_model)
    engine.insert([req("d", ids_of(demo_model, LONG), 4)])
    assert [e.key for e in engine.step()] == []


@pytest.mark.parametrize("solo", [False, True])
def test_tokens_are_the_same_with_and_without_the_pause(demo_model, solo):
    def requests() -> tuple[list[Any], list[Any]]:
        grammar = engine.compile_grammar({"type": "json_object"})
        first = [req("a", ids_of(demo_model, "Hello"), 20), req("s", ids_of(demo_model, "The weather"), 20,
                                                                  temperature=1.0, seed=7)]
        mid = [req("b", ids_of(demo_model, LONG), 16),
               req("c", ids_of(demo_model), 16, controls=controls(grammar=grammar, logprobs=True, top_logprobs=2,
                                                                  frequency_penalty=0.5)),
               req("n", ids_of(demo_model, LONG + " now"), 8, temperature=0.8, seed=3, n=2)]
        return (first[:1] if solo else first), mid

    results = []
    for tokens in (0, 2048):
        engine = make_engine(demo_model, solo=solo, prefill_step_size=8, prefill_first_tokens=tokens)
        first, mid = requests()
        results.append(by_index(engine, first, mid=mid))
    paused, plain = results[1], results[0]
    assert paused.keys() == plain.keys() and len(paused) == (5 if solo else 6)
    for key in plain:
        assert paused[key].token_ids == plain[key].token_ids, key
        assert paused[key].finish_reason == plain[key].finish_reason, key
    assert [e["logprob"] for e in paused[("c", 0)].logprobs] == \
        pytest.approx([e["logprob"] for e in plain[("c", 0)].logprobs], abs=1e-4)  # type: ignore[attr-defined]
