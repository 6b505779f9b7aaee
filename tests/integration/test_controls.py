"""The engine's decoding controls with real MLX, in-process, on the demo model.

Each control is checked against what it must do (a recomputation with mlx-lm, a count, a
parse), on the solo path, the batch path and across the solo→batch handoff; and a batch
with a controlled row must decode its other rows exactly as without it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from tests.integration.test_solo import Result, drain, make_engine, req

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPT = "Tell me a story about"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def controls(**kwargs: Any) -> Any:
    from workers.engine.interface import Controls

    return Controls(**kwargs)


def ids_of(demo_model: tuple[Any, Any], text: str = PROMPT) -> list[int]:
    return list(demo_model[1].encode(text))


def by_index(engine: Any, reqs: list[Any], mid: list[Any] | None = None) -> dict[tuple[str, int], Result]:
    """Run ``reqs`` (and ``mid``, inserted after three steps); each completion's result and logprobs."""
    out: dict[tuple[str, int], Result] = {}
    engine.insert(reqs)
    for step in range(10_000):
        if not engine.active:
            break
        if step == 3 and mid:
            engine.insert(mid)
        for ev in engine.step():
            res = out.setdefault((ev.key, ev.index), Result())
            res.token_ids += ev.token_ids
            res.text += ev.text
            res.logprobs = getattr(res, "logprobs", []) + (ev.logprobs or [])  # type: ignore[attr-defined]
            if ev.finish_reason is not None:
                res.finish_reason, res.completion_tokens = ev.finish_reason, ev.completion_tokens
    assert not engine.active
    return out


PATHS = ["solo", "batch", "handoff"]


def run_path(demo_model: tuple[Any, Any], path: str, request: Any) -> Result:
    """``request`` decoded alone (solo), in a batch from its start, or solo then handed off."""
    engine = make_engine(demo_model, solo=path != "batch")
    other = [req("other", ids_of(demo_model, "Hello"), 6)]
    out = by_index(engine, [request], mid=other if path == "handoff" else None)
    assert engine.stats.handoffs == (1 if path == "handoff" else 0)
    return out[(request.key, 0)]


def test_without_controls_the_batch_gives_mlx_lm_s_own_tokens(demo_model: tuple[Any, Any]) -> None:
    """The controlled BatchGenerator's plain path is mlx-lm's step: same tokens as mlx-lm's BatchGenerator."""
    from tests.integration.reference import batch_generator_tokens

    prompts = [ids_of(demo_model, p) for p in ("Hello", PROMPT, "The weather today is")]
    theirs = batch_generator_tokens(demo_model[0], prompts, 12, [[t] for t in demo_model[1].eos_token_ids])
    out = by_index(make_engine(demo_model, solo=False), [req(f"r{i}", p, 12) for i, p in enumerate(prompts)])
    assert [out[(f"r{i}", 0)].token_ids for i in range(3)] == theirs


@pytest.mark.parametrize("path", PATHS)
def test_logprobs_equal_mlx_lm_s_recomputation(demo_model: tuple[Any, Any], path: str) -> None:
    """Each token's logprob is the log-softmax of the model's raw logits (1e-4); the top list is sorted."""
    import mlx.core as mx

    model, tok = demo_model
    ids = ids_of(demo_model)
    res = run_path(demo_model, path, req("lp", ids, 10, temperature=0.7, seed=5,
                                         controls=controls(logprobs=True, top_logprobs=5)))
    entries = res.logprobs  # type: ignore[attr-defined]
    assert [e["token_id"] for e in entries] == res.token_ids and len(entries) == 10
    logits = model(mx.array([ids + res.token_ids[:-1]]))[0, len(ids) - 1:].astype(mx.float32)
    expected = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
    for pos, entry in enumerate(entries):
        assert entry["logprob"] == pytest.approx(expected[pos][entry["token_id"]], abs=1e-4)
        top = entry["top_logprobs"]
        assert len(top) == 5 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        best = sorted(range(len(expected[pos])), key=lambda t: -expected[pos][t])[:5]
        assert [t["token_id"] for t in top] == best
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0 + 1e-6
        assert bytes(entry["bytes"]) == tok._tokenizer.decode([entry["token_id"]]).encode() or "\ufffd" in entry["token"]


@pytest.mark.parametrize("path", PATHS)
def test_a_schema_constrained_output_parses_and_validates(demo_model: tuple[Any, Any], path: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    engine = make_engine(demo_model)
    grammar = engine.compile_grammar({"type": "json_schema", "schema": SCHEMA})
    res = run_path(demo_model, path, req("j", ids_of(demo_model), 200, controls=controls(grammar=grammar)))
    assert res.finish_reason == "stop"
    jsonschema.validate(json.loads(res.text), SCHEMA)


@pytest.mark.parametrize("spec, check", [
    ({"type": "regex", "pattern": "[a-z]{3,8}-[0-9]{2}"}, lambda t: re.fullmatch("[a-z]{3,8}-[0-9]{2}", t)),
    ({"type": "choice", "choices": ["yes", "no", "maybe later"]}, lambda t: t in ("yes", "no", "maybe later")),
    ({"type": "json_object"}, lambda t: isinstance(json.loads(t), dict)),
    ({"type": "lark", "grammar": 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'},
     lambda t: re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", t)),
], ids=["regex", "choice", "json-object", "lark"])
def test_grammar_outputs_match(demo_model: tuple[Any, Any], spec: dict[str, Any], check: Any) -> None:
    engine = make_engine(demo_model, solo=False)
    grammar = engine.compile_grammar(spec)
    reqs = [req(f"g{i}", ids_of(demo_model), 120, temperature=1.0, seed=i, controls=controls(grammar=grammar))
            for i in range(3)]
    out = by_index(engine, reqs)
    for i in range(3):
        assert out[(f"g{i}", 0)].finish_reason == "stop" and check(out[(f"g{i}", 0)].text), out[(f"g{i}", 0)].text


def test_a_cut_short_grammar_ends_with_length(demo_model: tuple[Any, Any]) -> None:
    engine = make_engine(demo_model)
    grammar = engine.compile_grammar({"type": "json_schema", "schema": SCHEMA})
    res = by_index(engine, [req("j", ids_of(demo_model), 3, controls=controls(grammar=grammar))])[("j", 0)]
    assert res.finish_reason == "length" and res.text.startswith("{")


def test_a_grammar_the_compiler_refuses_raises_its_message(demo_model: tuple[Any, Any]) -> None:
    from workers.engine.grammar import GrammarError

    engine = make_engine(demo_model)
    with pytest.raises(GrammarError, match="regex"):
        engine.compile_grammar({"type": "regex", "pattern": "(["})
    with pytest.raises(GrammarError):
        engine.compile_grammar({"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}})


def test_n_greedy_completions_are_the_same_and_prefilled_once(demo_model: tuple[Any, Any]) -> None:
    engine = make_engine(demo_model, solo=False, entries=8)
    ids = ids_of(demo_model)
    out = by_index(engine, [req("n", ids, 8, n=4)])
    assert len({tuple(out[("n", i)].token_ids) for i in range(4)}) == 1
    stats = engine.cache_stats
    assert (stats.misses, stats.forks, stats.fork_tokens) == (1, 3, 3 * (len(ids) - 1))  # one lookup, one prefill
    single = by_index(make_engine(demo_model, solo=False), [req("one", ids, 8)])
    assert out[("n", 0)].token_ids == single[("one", 0)].token_ids


def test_seeded_n_reproduces_and_completion_i_draws_with_seed_plus_i(demo_model: tuple[Any, Any]) -> None:
    ids = ids_of(demo_model)
    runs = [by_index(make_engine(demo_model, solo=False), [req("s", ids, 8, temperature=1.0, seed=3, n=4)])
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(runs[0][("s", i)].token_ids) for i in range(4)}) == 4
    alone = by_index(make_engine(demo_model, solo=False), [req("s", ids, 8, temperature=1.0, seed=5)])
    assert alone[("s", 0)].token_ids == runs[0][("s", 2)].token_ids


@pytest.mark.parametrize("path", PATHS)
def test_frequency_penalty_repeats_less(demo_model: tuple[Any, Any], path: str) -> None:
    ids = ids_of(demo_model)
    plain = run_path(demo_model, path, req("p", ids, 120))
    penalised = run_path(demo_model, path, req("p", ids, 120, controls=controls(frequency_penalty=1.0)))

    def repeats(tokens: list[int]) -> int:
        return len(tokens) - len(set(tokens))

    assert repeats(penalised.token_ids) < repeats(plain.token_ids) // 2


def test_penalties_count_generated_tokens_not_the_prompt(demo_model: tuple[Any, Any]) -> None:
    """A prompt made of the greedy first token does not stop it coming first, however strong the penalty."""
    ids = ids_of(demo_model)
    first = by_index(make_engine(demo_model), [req("a", ids, 1)])[("a", 0)].token_ids[0]
    prompt = ids + [first] * 20
    plain = by_index(make_engine(demo_model), [req("a", prompt, 2)])[("a", 0)].token_ids
    hard = controls(presence_penalty=2.0, frequency_penalty=2.0, repetition_penalty=10.0)
    penalised = by_index(make_engine(demo_model), [req("a", prompt, 2, controls=hard)])[("a", 0)].token_ids
    assert penalised[0] == plain[0]


@pytest.mark.parametrize("path", PATHS)
def test_logit_bias_minus_100_keeps_a_token_out(demo_model: tuple[Any, Any], path: str) -> None:
    ids = ids_of(demo_model)
    plain = run_path(demo_model, path, req("b", ids, 40))
    banned = max(set(plain.token_ids), key=plain.token_ids.count)
    biased = run_path(demo_model, path, req("b", ids, 40, controls=controls(logit_bias={banned: -100.0})))
    assert banned in plain.token_ids and banned not in biased.token_ids


def test_min_p_one_keeps_only_the_top_token(demo_model: tuple[Any, Any]) -> None:
    ids = ids_of(demo_model)
    greedy = by_index(make_engine(demo_model), [req("m", ids, 16)])[("m", 0)].token_ids
    hot = by_index(make_engine(demo_model), [req("m", ids, 16, temperature=2.0, seed=1,
                                                 controls=controls(min_p=1.0))])[("m", 0)].token_ids
    assert hot == greedy


def test_a_controlled_row_leaves_the_other_rows_as_they_were(demo_model: tuple[Any, Any]) -> None:
    prompts = [ids_of(demo_model, p) for p in ("Hello", "The weather today is", "Tell me about queues")]
    plain = by_index(make_engine(demo_model, solo=False), [req(f"r{i}", p, 16) for i, p in enumerate(prompts)])
    engine = make_engine(demo_model, solo=False)
    grammar = engine.compile_grammar({"type": "json_object"})
    mixed = by_index(engine, [req(f"r{i}", p, 16) for i, p in enumerate(prompts)] + [
        req("c", ids_of(demo_model), 16, controls=controls(grammar=grammar, frequency_penalty=1.0, logprobs=True,
                                                         logit_bias={5: 3.0}, min_p=0.05))])
    assert [mixed[(f"r{i}", 0)].token_ids for i in range(3)] == [plain[(f"r{i}", 0)].token_ids for i in range(3)]
    assert engine.stats.masked_steps > 0 and engine.stats.mask_s > 0
