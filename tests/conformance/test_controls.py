"""The decoding controls over raw pyzmq: penalties, logit_bias, min_p, logprobs, n, grammars.

Field bounds are checked on the suite's main fleet. The behaviours run on a fleet of this
module's own (the ``demo`` model, 8 sequences at once, so ``n = 4`` fits), or with
``--connect`` on the fleet given, when its model takes them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterator

import pytest

from tests.conformance.conftest import Target
from tests.integration.clients import RawClient, generate
from tests.schemas import random_schemas

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "demo"
CAPACITY = 8
PROMPT = "Tell me a story about"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "n": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def ctl(request: pytest.FixtureRequest) -> Iterator[Target]:
    """A fleet whose one model decodes 8 sequences at once (or the --connect fleet)."""
    addr = request.config.getoption("--connect")
    if addr:
        wire = RawClient(addr)
        try:
            yield Target(addr, wire.first_model()["name"])
        finally:
            wire.close()
        return
    from actors.config import BatchingConfig
    from tests.integration.fleets import start_fleet

    fleet = start_fleet(transport="tcp", models=((MODEL, MODEL, 1),),
                        batching=BatchingConfig(decode_capacity=CAPACITY, admission_batch=CAPACITY))
    try:
        yield Target(fleet.cfg.frontend, MODEL, fleet)
    finally:
        fleet.stop()


@pytest.fixture
def cw(ctl: Target) -> Iterator[RawClient]:
    w = RawClient(ctl.addr)
    try:
        yield w
    finally:
        w.close()


def run(wire: RawClient, request_id: str, model: str, **fields: Any) -> Any:
    """Send one generate and read it to its end (an Outcome: chunks and end)."""
    wire.send(generate(request_id, model, **fields))
    return wire.finish(request_id, timeout_s=300)


# ---- bounds: refused by name, on the suite's main fleet --------------------------------------

OVER: list[tuple[str, dict[str, Any], str]] = [
    ("repetition", {"repetition_penalty": 0}, "repetition_penalty"),
    ("presence", {"presence_penalty": 3}, "presence_penalty"),
    ("frequency", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("bias-value", {"logit_bias": {"1": 101}}, "logit_bias[1]"),
    ("bias-key", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("bias-entries", {"logit_bias": {str(i): 1 for i in range(301)}}, "max_logit_bias_entries"),
    ("min-p", {"min_p": -0.1}, "min_p"),
    ("top-logprobs", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top-without-logprobs", {"top_logprobs": 3}, "top_logprobs"),
    ("n", {"n": 17}, "n must"),
    ("best-of", {"best_of": 2}, "best_of"),
    ("grammar-type", {"grammar": {"type": "xml"}}, "grammar.type"),
    ("grammar-field", {"grammar": {"type": "regex", "regex": "a"}}, "grammar"),
    ("choices", {"grammar": {"type": "choice", "choices": []}}, "grammar.choices"),
    ("tool-choice", {"tool_choice": "always"}, "tool_choice"),
]


@pytest.mark.parametrize("fields, word", [(f, w) for _, f, w in OVER], ids=[i for i, _, _ in OVER])
def test_an_out_of_range_control_is_refused_naming_it(wire: RawClient, target: Target, fields: dict[str, Any],
                                                     word: str) -> None:
    reply = wire.call(generate("over", target.model, **fields), timeout_s=60)
    assert reply["type"] == "error" and reply["code"] == "bad_request" and reply["request_id"] == "over"
    assert word in reply["message"], reply["message"]


WORKER_REFUSES: list[tuple[str, dict[str, Any], str]] = [
    ("bias-past-vocab", {"logit_bias": {"99999999": -100}}, "logit_bias"),
    ("bad-regex", {"grammar": {"type": "regex", "pattern": "(["}}, "grammar: "),
    ("bad-schema", {"grammar": {"type": "json_schema", "schema": {"type": "object",
                                                                  "properties": {"a": {"type": "nope"}}}}}, "grammar: "),
    ("bad-lark", {"grammar": {"type": "lark", "grammar": "start: undefined_rule"}}, "grammar: "),
    ("tools", {"prompt": None, "messages": [{"role": "user", "content": "hi"}],
               "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
]


@pytest.mark.parametrize("fields, word", [(f, w) for _, f, w in WORKER_REFUSES], ids=[i for i, _, _ in WORKER_REFUSES])
def test_what_only_the_worker_can_check_is_refused_before_it_runs(cw: RawClient, ctl: Target, fields: dict[str, Any],
                                                                 word: str) -> None:
    end = run(cw, "refused", ctl.model, **fields).end
    assert end["type"] == "error" and end["code"] == "bad_request" and end["request_id"] == "refused"
    assert word in end["message"], end["message"]


# ---- behaviours ------------------------------------------------------------------------------


def _check_entries(entries: list[dict[str, Any]], ids: list[int], k: int) -> None:
    assert [e["token_id"] for e in entries] == ids
    for e in entries:
        assert set(e) == {"token", "token_id", "logprob", "bytes", "top_logprobs"} and e["logprob"] <= 0
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == k and tops == sorted(tops, reverse=True)
        assert sum(math.exp(t) for t in tops) <= 1.0 + 1e-6
        assert bytes(e["bytes"]).decode("utf-8", errors="replace") == e["token"]


def test_logprobs_stream_with_their_tokens_and_equal_mlx_lm_s(cw: RawClient, ctl: Target) -> None:
    streamed = run(cw, "lp-s", ctl.model, prompt=PROMPT, max_tokens=12, logprobs=True, top_logprobs=4)
    whole = run(cw, "lp-w", ctl.model, prompt=PROMPT, max_tokens=12, logprobs=True, top_logprobs=4, stream=False)
    entries = [e for c in streamed.chunks for e in c.get("logprobs") or []]
    _check_entries(entries, [t for c in streamed.chunks for t in c["token_ids"]], 4)
    _check_entries(whole.end["logprobs"], whole.end["token_ids"], 4)
    assert [e["logprob"] for e in entries] == pytest.approx([e["logprob"] for e in whole.end["logprobs"]], abs=1e-4)
    if ctl.fleet is None:
        return  # a fleet we did not start: its model is not ours to load
    import mlx.core as mx

    from workers.models.demo_model import ensure_demo_model
    from workers.models.precision import load_model

    model, tok = load_model(str(ensure_demo_model(MODEL)))
    prompt = list(tok.encode(PROMPT))
    ids = whole.end["token_ids"]
    logits = model(mx.array([prompt + ids[:-1]]))[0, len(prompt) - 1:].astype(mx.float32)
    expected = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
    for pos, e in enumerate(whole.end["logprobs"]):
        assert e["logprob"] == pytest.approx(expected[pos][e["token_id"]], abs=1e-4)


def _forks(wire: RawClient, model: str) -> int:
    rows = wire.call({"type": "status", "request_id": "st"})["status"]["models"][model]["workers"]
    return sum(int((w.get("stats") or {}).get("prompt_cache_forks", 0)) for w in rows)


def test_n_greedy_completions_agree_in_one_done_prefilled_once(cw: RawClient, ctl: Target) -> None:
    from tests.waiting import wait_for

    before = _forks(cw, ctl.model)
    end = run(cw, "n4", ctl.model, prompt=PROMPT, max_tokens=10, n=4, stream=False).end
    assert end["type"] == "done" and [c["index"] for c in end["choices"]] == [0, 1, 2, 3]
    assert len({c["text"] for c in end["choices"]}) == 1 and all(c["finish_reason"] == "length" for c in end["choices"])
    assert end["usage"]["completion_tokens"] == sum(c["completion_tokens"] for c in end["choices"]) == 40
    wait_for(lambda: _forks(cw, ctl.model) == before + 3, timeout_s=10, what="the fork counter (heartbeat stats)")


def test_seeded_n_reproduces_and_streams_by_index(cw: RawClient, ctl: Target) -> None:
    fields = dict(prompt=PROMPT, max_tokens=8, n=4, temperature=1.0, seed=11)
    ends = [run(cw, f"seeded-{i}", ctl.model, stream=False, **fields).end for i in range(2)]
    assert [c["token_ids"] for c in ends[0]["choices"]] == [c["token_ids"] for c in ends[1]["choices"]]
    assert len({tuple(c["token_ids"]) for c in ends[0]["choices"]}) > 1
    streamed = run(cw, "seeded-s", ctl.model, **fields)
    for choice in ends[0]["choices"]:
        mine = [c for c in streamed.chunks if c.get("index", 0) == choice["index"]]
        assert [t for c in mine for t in c["token_ids"]] == choice["token_ids"]
        assert "".join(c["text"] for c in mine) == choice["text"]
    assert "choices" in streamed.end and all("text" not in c for c in streamed.end["choices"])


def test_cancel_ends_all_n_completions_with_one_done(cw: RawClient, ctl: Target) -> None:
    cw.send(generate("n-cancel", ctl.model, prompt=PROMPT, max_tokens=2000, n=3))
    cw.reply_to("n-cancel", timeout_s=60)  # a first chunk: it runs
    cw.send({"type": "cancel", "request_id": "n-cancel"})
    out = cw.finish("n-cancel")
    assert out.end["type"] == "done" and out.end["finish_reason"] == "cancelled"
    cw.settle(timeout_s=2)


def test_frequency_penalty_repeats_less_and_logit_bias_bans(cw: RawClient, ctl: Target) -> None:
    plain = run(cw, "plain", ctl.model, prompt=PROMPT, max_tokens=120, stream=False).end["token_ids"]
    penalised = run(cw, "pen", ctl.model, prompt=PROMPT, max_tokens=120, stream=False,
                    frequency_penalty=1.0).end["token_ids"]
    assert len(penalised) - len(set(penalised)) < len(plain) - len(set(plain))
    banned = max(set(plain), key=plain.count)
    biased = run(cw, "bias", ctl.model, prompt=PROMPT, max_tokens=120, stream=False,
                 logit_bias={str(banned): -100}).end["token_ids"]
    assert banned in plain and banned not in biased


def test_min_p_and_repetition_penalty_are_honoured(cw: RawClient, ctl: Target) -> None:
    greedy = run(cw, "g", ctl.model, prompt=PROMPT, max_tokens=16, stream=False).end["token_ids"]
    top_only = run(cw, "mp", ctl.model, prompt=PROMPT, max_tokens=16, stream=False, temperature=2.0, seed=3,
                   min_p=1.0).end["token_ids"]
    assert top_only == greedy
    rep = run(cw, "rp", ctl.model, prompt=PROMPT, max_tokens=120, stream=False, repetition_penalty=1.5).end
    assert rep["type"] == "done" and len(rep["token_ids"]) - len(set(rep["token_ids"])) < 20


@pytest.mark.parametrize("grammar, check", [
    ({"type": "regex", "pattern": "[a-z]{2,6}@[a-z]{2,5}\\.(com|org)"},
     lambda t: re.fullmatch("[a-z]{2,6}@[a-z]{2,5}\\.(com|org)", t)),
    ({"type": "choice", "choices": ["Paris", "London", "Rome"]}, lambda t: t in ("Paris", "London", "Rome")),
    ({"type": "json_object"}, lambda t: isinstance(json.loads(t), dict)),
    ({"type": "json_schema", "schema": SCHEMA, "strict": True}, lambda t: set(json.loads(t)) == {"name", "n"}),
], ids=["regex", "choice", "json-object", "json-schema"])
def test_grammar_output_matches(cw: RawClient, ctl: Target, grammar: dict[str, Any], check: Any) -> None:
    for stream, temperature in ((False, 0.0), (True, 1.0)):
        out = run(cw, f"gr-{stream}", ctl.model, prompt=PROMPT, max_tokens=200, stream=stream, temperature=temperature, seed=1,
                  grammar=grammar)
        text = out.end["text"] if not stream else out.text
        assert out.end["finish_reason"] == "stop" and check(text), text


def _schema_outputs(wire: RawClient, model: str, count: int, prompt: Any, **fields: Any) -> None:
    """``count`` random schemas, each greedy and sampled, all in flight at once; every output validates."""
    jsonschema = pytest.importorskip("jsonschema")
    schemas = random_schemas(count, seed=7)
    for i, schema in enumerate(schemas):
        for mode, temperature in (("g", 0.0), ("s", 1.0)):
            wire.send(generate(f"{mode}{i}", model, prompt=prompt, max_tokens=400, stream=False,
                               temperature=temperature, seed=i, grammar={"type": "json_schema", "schema": schema},
                               **fields))
    for i, schema in enumerate(schemas):
        for mode in ("g", "s"):
            end = wire.finish(f"{mode}{i}", timeout_s=900).end
            assert end["type"] == "done" and end["finish_reason"] == "stop", (schema, end)
            jsonschema.validate(json.loads(end["text"]), schema)


def test_random_schemas_validate(cw: RawClient, ctl: Target) -> None:
    _schema_outputs(cw, ctl.model, 6, PROMPT)


@pytest.mark.slow
def test_fifty_random_schemas_validate_greedy_and_sampled(cw: RawClient, ctl: Target) -> None:
    ctl.local("a hundred grammar requests at once; the six above cover a fleet given with --connect")
    _schema_outputs(cw, ctl.model, 50, PROMPT)
