"""Unit tests for the decoding controls and tool fields of ``generate``, and the new reply fields."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from actors.protocol import (
    BAD_REQUEST, PROTOCOL_TAG, Chunk, Done, Generate, Limits, ProtocolError, decode, encode, parse_logit_bias,
)

pytestmark = pytest.mark.timeout(30)

FN = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TURN = [{"role": "user", "content": "hi"}]


def gen(**fields: Any) -> list[bytes]:
    base: dict[str, Any] = {"type": "generate", "request_id": "r1", "model": "demo", "prompt": "hi"}
    base.update(fields)
    return [PROTOCOL_TAG, msgpack.packb({k: v for k, v in base.items() if v is not ...}, use_bin_type=True)]


GOOD: list[tuple[str, dict[str, Any]]] = [
    ("repetition-penalty", {"repetition_penalty": 10}),
    ("repetition-penalty-small", {"repetition_penalty": 0.01}),
    ("presence", {"presence_penalty": -2.0, "frequency_penalty": 2}),
    ("logit-bias", {"logit_bias": {"0": -100, "17": 100.0, "2147483647": 0.5}}),
    ("logit-bias-300", {"logit_bias": {str(i): 1.0 for i in range(300)}}),
    ("min-p", {"min_p": 1}),
    ("logprobs", {"logprobs": True, "top_logprobs": 20}),
    ("logprobs-alone", {"logprobs": True}),
    ("n", {"n": 16}),
    ("schema", {"grammar": {"type": "json_schema", "schema": {"type": "object"}, "strict": True}}),
    ("json-object", {"grammar": {"type": "json_object"}}),
    ("regex", {"grammar": {"type": "regex", "pattern": "[a-z]+"}}),
    ("lark", {"grammar": {"type": "lark", "grammar": "start: \"a\""}}),
    ("choice", {"grammar": {"type": "choice", "choices": ["yes", "no"]}}),
    ("tools", {"prompt": None, "messages": TURN, "tools": [FN], "tool_choice": "auto", "parallel_tool_calls": False}),
    ("tool-choice-map", {"prompt": None, "messages": TURN, "tools": [FN],
                         "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ("tool-choice-none", {"tool_choice": "none"}),
]


@pytest.mark.parametrize("fields", [f for _, f in GOOD], ids=[i for i, _ in GOOD])
def test_accepted(fields: dict[str, Any]) -> None:
    msg = decode(gen(**fields))
    assert isinstance(msg, Generate)
    for key, value in fields.items():
        if value is not None:
            assert getattr(msg, key) == value


# (id, fields, words the message must hold: the field's name first)
BAD: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("repetition-zero", {"repetition_penalty": 0.0}, ("repetition_penalty",)),
    ("repetition-over", {"repetition_penalty": 10.5}, ("repetition_penalty", "10")),
    ("presence-over", {"presence_penalty": 2.5}, ("presence_penalty",)),
    ("frequency-under", {"frequency_penalty": -2.01}, ("frequency_penalty",)),
    ("frequency-type", {"frequency_penalty": "1"}, ("frequency_penalty",)),
    ("bias-key", {"logit_bias": {"-1": 1.0}}, ("logit_bias",)),
    ("bias-key-word", {"logit_bias": {"a": 1.0}}, ("logit_bias",)),
    ("bias-key-big", {"logit_bias": {"99999999999": 1.0}}, ("logit_bias",)),
    ("bias-value", {"logit_bias": {"5": 100.5}}, ("logit_bias[5]",)),
    ("bias-value-type", {"logit_bias": {"5": "x"}}, ("logit_bias[5]",)),
    ("bias-value-bool", {"logit_bias": {"5": True}}, ("logit_bias[5]",)),
    ("bias-entries", {"logit_bias": {str(i): 1.0 for i in range(301)}}, ("logit_bias", "max_logit_bias_entries")),
    ("min-p", {"min_p": 1.5}, ("min_p",)),
    ("top-logprobs-over", {"logprobs": True, "top_logprobs": 21}, ("top_logprobs",)),
    ("top-logprobs-alone", {"top_logprobs": 2}, ("top_logprobs", "logprobs")),
    ("logprobs-type", {"logprobs": 1}, ("logprobs",)),
    ("n-zero", {"n": 0}, ("n must",)),
    ("n-over", {"n": 17}, ("n must", "16")),
    ("best-of", {"best_of": 2}, ("best_of",)),
    ("grammar-type", {"grammar": {"type": "yaml"}}, ("grammar.type",)),
    ("grammar-no-type", {"grammar": {"schema": {}}}, ("grammar.type",)),
    ("grammar-field", {"grammar": {"type": "regex", "pattern": "a", "x": 1}}, ("grammar", "'x'")),
    ("grammar-missing", {"grammar": {"type": "json_schema"}}, ("grammar", "schema")),
    ("grammar-schema-type", {"grammar": {"type": "json_schema", "schema": "{}"}}, ("grammar.schema",)),
    ("grammar-strict-type", {"grammar": {"type": "json_schema", "schema": {}, "strict": 1}}, ("grammar.strict",)),
    ("grammar-empty-regex", {"grammar": {"type": "regex", "pattern": ""}}, ("grammar.pattern",)),
    ("grammar-choices-empty", {"grammar": {"type": "choice", "choices": []}}, ("grammar.choices",)),
    ("grammar-choices-many", {"grammar": {"type": "choice", "choices": ["a"] * 257}}, ("max_choices",)),
    ("grammar-choices-type", {"grammar": {"type": "choice", "choices": ["a", 1]}}, ("grammar.choices",)),
    ("grammar-size", {"grammar": {"type": "regex", "pattern": "a" * 300_000}}, ("max_grammar_bytes",)),
    ("tools-no-messages", {"tools": [FN]}, ("tools", "messages")),
    ("tools-many", {"prompt": None, "messages": TURN, "tools": [FN] * 129}, ("max_tools",)),
    ("tools-shape", {"prompt": None, "messages": TURN, "tools": [{"type": "code"}]}, ("tools[0]",)),
    ("tools-name", {"prompt": None, "messages": TURN,
                    "tools": [{"type": "function", "function": {"name": "a b"}}]}, ("tools[0].function.name",)),
    ("tool-choice-word", {"tool_choice": "any"}, ("tool_choice",)),
    ("tool-choice-needs-tools", {"tool_choice": "required"}, ("tool_choice", "tools")),
    ("tool-choice-unknown-fn", {"prompt": None, "messages": TURN, "tools": [FN],
                                "tool_choice": {"type": "function", "function": {"name": "other"}}},
     ("tool_choice", "other")),
    ("tool-choice-type", {"tool_choice": 3}, ("tool_choice",)),
    ("parallel-type", {"parallel_tool_calls": "yes"}, ("parallel_tool_calls",)),
]


@pytest.mark.parametrize("fields, words", [(f, w) for _, f, w in BAD], ids=[i for i, _, _ in BAD])
def test_refused_naming_the_field(fields: dict[str, Any], words: tuple[str, ...]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(gen(**fields))
    assert info.value.code == BAD_REQUEST
    assert info.value.request_id == "r1"
    assert all(w in info.value.message for w in words), info.value.message


def test_limits_are_settings() -> None:
    small = Limits(max_logit_bias_entries=2, max_choices=1, max_tools=0)
    with pytest.raises(ProtocolError, match="max_logit_bias_entries=2"):
        decode(gen(logit_bias={"1": 1, "2": 1, "3": 1}), small)
    with pytest.raises(ProtocolError, match="max_choices"):
        decode(gen(grammar={"type": "choice", "choices": ["a", "b"]}), small)


def test_defaults_stay_off_the_wire() -> None:
    """A request that sets no control carries none of their keys, so older peers read it as before."""
    payload = msgpack.unpackb(encode(Generate("r1", "demo", prompt="hi"))[1])
    for key in ("presence_penalty", "frequency_penalty", "min_p", "logprobs", "top_logprobs", "n",
                "parallel_tool_calls", "logit_bias", "grammar", "tools", "tool_choice", "repetition_penalty"):
        assert key not in payload
    payload = msgpack.unpackb(encode(Generate("r1", "demo", prompt="hi", n=2, logprobs=True,
                                              parallel_tool_calls=False))[1])
    assert payload["n"] == 2 and payload["logprobs"] is True and payload["parallel_tool_calls"] is False


def test_reply_fields_round_trip() -> None:
    lp = [{"token": "a", "token_id": 5, "logprob": -0.5, "bytes": [97],
           "top_logprobs": [{"token": "a", "token_id": 5, "logprob": -0.5, "bytes": [97]}]}]
    chunk = Chunk("r1", "a", [5], 0, 0, index=3, logprobs=lp,
                  tool_calls=[{"index": 0, "id": "call_1", "name": "f", "arguments": "{"}])
    assert decode(encode(chunk)) == chunk
    assert "index" not in msgpack.unpackb(encode(Chunk("r1", "a", [5]))[1])
    done = Done("r1", "tool_calls", {"completion_tokens": 2}, choices=[{"index": 0, "finish_reason": "stop"}],
                logprobs=lp, tool_calls=[{"id": "call_1", "name": "f", "arguments": "{}"}], warning="w")
    assert decode(encode(done)) == done


def test_parse_logit_bias() -> None:
    assert parse_logit_bias({"3": 1, "10": -100.0}) == {3: 1.0, 10: -100.0}
