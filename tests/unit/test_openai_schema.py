"""OpenAI request parsing, error mapping and response bodies (pure, no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors.protocol import ERROR_CODES, Limits
from mlx_fleet.client import Completion
from mlx_fleet.gateway.openai_responses import SSE_DONE, ResponseFormat, usage_body
from mlx_fleet.gateway.openai_schema import (
    CHAT, COMPLETION, DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, OpenAIError, error_from_fleet, parse_chat_request,
    parse_completion_request,
)

MSG = [{"role": "user", "content": "Hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": MSG, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "demo", "prompt": "Hello", **fields}


# ---- accepted requests ------------------------------------------------------------------


def test_chat_defaults():
    p = parse_chat_request(chat())
    assert (p.kind, p.model, p.stream, p.include_usage) == (CHAT, "demo", False, False)
    assert p.options == {"messages": MSG, "max_tokens": DEFAULT_MAX_TOKENS, "temperature": DEFAULT_TEMPERATURE, "top_p": 1.0}


@pytest.mark.parametrize("fields, want", [
    ({"max_tokens": 7}, {"max_tokens": 7}),
    ({"max_completion_tokens": 9}, {"max_tokens": 9}),
    ({"max_completion_tokens": 9, "max_tokens": 9}, {"max_tokens": 9}),
    ({"temperature": 0}, {"temperature": 0.0}),
    ({"temperature": 2}, {"temperature": 2.0}),
    ({"top_p": 0.5}, {"top_p": 0.5}),
    ({"stop": "\n"}, {"stop": ["\n"]}),
    ({"stop": ["a", "bb", "a"]}, {"stop": ["a", "bb"]}),
    ({"stop": []}, {}),
    ({"seed": 0}, {"seed": 0}),
    ({"top_k": 40}, {"top_k": 40}),
    ({"timeout_s": 0.25}, {"timeout_s": 0.25}),
    ({"priority": "urgent"}, {"priority": "urgent"}),
    # null is the same as absent
    ({"max_tokens": None, "stop": None, "seed": None, "n": None, "tools": None}, {}),
    # ignored metadata
    ({"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}, {}),
    # neutral values of unsupported features
    ({"n": 1, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
      "logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
      "modalities": ["text"]}, {}),
])
def test_chat_options(fields, want):
    options = parse_chat_request(chat(**fields)).options
    for key, value in want.items():
        assert options[key] == value
    if not want:
        assert set(options) == {"messages", "max_tokens", "temperature", "top_p"}


@pytest.mark.parametrize("messages, want", [
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
     [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]),
    ([{"role": "developer", "content": "D"}], [{"role": "system", "content": "D"}]),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
     [{"role": "user", "content": "ab"}]),
    ([{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": None, "tool_calls": []}],
     [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]),
])
def test_chat_messages(messages, want):
    assert parse_chat_request(chat(messages=messages)).options["messages"] == want


def test_stream_flags():
    p = parse_chat_request(chat(stream=True, stream_options={"include_usage": True}))
    assert (p.stream, p.include_usage) == (True, True)
    p = parse_completion_request(completion(stream=True))
    assert (p.stream, p.include_usage) == (True, False)


@pytest.mark.parametrize("prompt, want", [
    ("Hello", {"prompt": "Hello"}),
    (["Hello"], {"prompt": "Hello"}),
    ([1, 2, 3], {"prompt_tokens": [1, 2, 3]}),
    ([[4, 5]], {"prompt_tokens": [4, 5]}),
])
def test_completion_prompts(prompt, want):
    p = parse_completion_request(completion(prompt=prompt))
    assert p.kind == COMPLETION
    assert {k: v for k, v in p.options.items() if k.startswith("prompt")} == want


def test_completion_neutral_values():
    p = parse_completion_request(completion(echo=False, best_of=1, suffix="", n=1, user="x"))
    assert p.options["prompt"] == "Hello" and "n" not in p.options


# ---- refused requests ---------------------------------------------------------------------

CHAT_REFUSALS = [
    # (fields, param, code)
    ({"n": True}, "n", "invalid_value"),
    ({"n": 17}, "n", "invalid_value"),
    ({"top_logprobs": 3}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({"logit_bias": {"x": 5}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"1": 101}}, "logit_bias", "invalid_value"),
    ({"min_p": 1.5}, "min_p", "invalid_value"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "blob"}}}},
     "response_format", "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "missing_required_parameter"),
    ({"audio": {"voice": "x"}}, "audio", "unsupported_parameter"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ({"best_of": 2}, "best_of", "unknown_parameter"),
    ({"max_completion_tokens": 3, "max_tokens": 4}, "max_completion_tokens", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"max_tokens": 10**6}, "max_tokens", "invalid_value"),
    ({"max_tokens": 5.0}, "max_tokens", "invalid_value"),
    ({"temperature": 2.5}, "temperature", "invalid_value"),
    ({"temperature": -0.1}, "temperature", "invalid_value"),
    ({"temperature": "hot"}, "temperature", "invalid_value"),
    ({"temperature": True}, "temperature", "invalid_value"),
    ({"temperature": float("nan")}, "temperature", "invalid_value"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"top_p": 1.5}, "top_p", "invalid_value"),
    ({"stop": ""}, "stop", "invalid_value"),
    ({"stop": ["ok", 3]}, "stop", "invalid_value"),
    ({"stop": ["s"] * 17}, "stop", "invalid_value"),
    ({"seed": -1}, "seed", "invalid_value"),
    ({"seed": "7"}, "seed", "invalid_value"),
    ({"stream": "yes"}, "stream", "invalid_value"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options", "invalid_value"),
    ({"stream": True, "stream_options": {"foo": 1}}, "stream_options", "unknown_parameter"),
    ({"priority": "vip"}, "priority", "invalid_value"),
    ({"timeout_s": 0}, "timeout_s", "invalid_value"),
    ({"model": ""}, "model", "missing_required_parameter"),
    ({"model": 3}, "model", "missing_required_parameter"),
    ({"messages": []}, "messages", "missing_required_parameter"),
    ({"messages": "hi"}, "messages", "missing_required_parameter"),
    ({"messages": ["hi"]}, "messages[0]", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "unsupported_parameter"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "messages[0].tool_calls[0]", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "user", "content": "y", "foo": 1}]},
     "messages[1].foo", "unsupported_parameter"),
]


@pytest.mark.parametrize("fields, param, code", CHAT_REFUSALS)
def test_chat_refusals_are_400_naming_the_parameter(fields, param, code):
    with pytest.raises(OpenAIError) as info:
        parse_chat_request(chat(**fields))
    err = info.value
    assert (err.status, err.param, err.code, err.type) == (400, param, code, "invalid_request_error")
    assert err.message


@pytest.mark.parametrize("fields, param, code", [
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    ({"prompt": None}, "prompt", "missing_required_parameter"),
    ({"prompt": []}, "prompt", "invalid_value"),
    ({"prompt": [1, -2]}, "prompt", "invalid_value"),
    ({"prompt": {"text": "x"}}, "prompt", "invalid_value"),
    ({"echo": True}, "echo", "unsupported_parameter"),
    ({"best_of": 3}, "best_of", "unsupported_parameter"),
    ({"logprobs": 6}, "logprobs", "invalid_value"),
    ({"suffix": "end"}, "suffix", "unsupported_parameter"),
    ({"max_completion_tokens": 5}, "max_completion_tokens", "unknown_parameter"),
    ({"messages": MSG}, "messages", "unknown_parameter"),
])
def test_completion_refusals(fields, param, code):
    with pytest.raises(OpenAIError) as info:
        parse_completion_request(completion(**fields))
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code)


@pytest.mark.parametrize("body", [None, [], "x", 3])
def test_body_must_be_an_object(body):
    with pytest.raises(OpenAIError) as info:
        parse_chat_request(body)
    assert (info.value.status, info.value.code) == (400, "invalid_json")


def test_protocol_limits_apply():
    small = Limits(max_prompt_chars=10)
    with pytest.raises(OpenAIError) as info:
        parse_completion_request(completion(prompt="x" * 11), limits=small)
    assert info.value.status == 400 and "max_prompt_chars" in info.value.message
    with pytest.raises(OpenAIError):
        parse_chat_request(chat(messages=[{"role": "user", "content": "y" * 11}]), limits=small)


# ---- error mapping ------------------------------------------------------------------------

WANT_STATUS = {
    "bad_request": 400, "unknown_model": 404, "overloaded": 429, "timeout": 504, "unavailable": 503,
    "worker_lost": 502, "cancelled": 503, "internal": 500, "over_budget": 503, "duplicate_request": 409,
}
WANT_TYPE = {
    400: "invalid_request_error", 404: "invalid_request_error", 409: "invalid_request_error", 429: "rate_limit_error", 504: "timeout_error",
    503: "service_unavailable_error", 502: "server_error", 500: "server_error",
}


def test_every_protocol_error_code_is_mapped():
    assert set(WANT_STATUS) == set(ERROR_CODES)


@pytest.mark.parametrize("code, status", sorted(WANT_STATUS.items()))
def test_error_mapping(code, status):
    err = error_from_fleet(code, "why")
    body = err.body()
    assert err.status == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] == "why"
    assert body["error"]["type"] == WANT_TYPE[status]
    assert body["error"]["code"] == ("model_not_found" if code == "unknown_model" else code)
    assert body["error"]["param"] == ("model" if code == "unknown_model" else None)


def test_unknown_fleet_code_is_a_500():
    assert error_from_fleet("teleported", "x").status == 500
    assert error_from_fleet("bad_reply", "x").status == 502


# ---- responses -----------------------------------------------------------------------------


def events(raw: bytes) -> list[Any]:
    assert raw.endswith(b"\n\n")
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ")
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


USAGE = {"prompt_tokens": 4, "completion_tokens": 3, "cached_tokens": 1}


def test_usage_body():
    assert usage_body(USAGE) == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                                 "prompt_tokens_details": {"cached_tokens": 1}}


@pytest.mark.parametrize("kind, obj", [(CHAT, "chat.completion"), (COMPLETION, "text_completion")])
def test_full_response(kind, obj):
    done = Completion("r", "hi", [1, 2], "length", USAGE)
    body = ResponseFormat(kind, completion_id="id1", model="demo", created_s=5).full(done)
    assert (body["id"], body["object"], body["model"], body["created"]) == ("id1", obj, "demo", 5)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    if kind == CHAT:
        assert choice["message"] == {"role": "assistant", "content": "hi"} and choice["logprobs"] is None
    else:
        assert choice["text"] == "hi"
    assert body["usage"]["total_tokens"] == 7


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_events(include_usage):
    fmt = ResponseFormat(CHAT, completion_id="c", model="demo", created_s=1, include_usage=include_usage)
    evs = events(fmt.start() + fmt.delta("Hel") + fmt.delta("lo") + fmt.finish(Completion("r", "", [], "stop", USAGE)))
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "c" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello"
    last_choice = [c for c in chunks if c["choices"]][-1]["choices"][0]
    assert last_choice["finish_reason"] == "stop" and last_choice["delta"] == {}
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)


def test_completion_stream_events():
    fmt = ResponseFormat(COMPLETION, completion_id="c", model="demo", created_s=1, include_usage=True)
    assert fmt.start() == b""
    evs = events(fmt.delta("ab") + fmt.finish(Completion("r", "", [], "length", USAGE)))
    assert [e if e == "[DONE]" else e["object"] for e in evs] == ["text_completion"] * 3 + ["[DONE]"]
    assert evs[0]["choices"][0]["text"] == "ab"
    assert evs[1]["choices"][0]["finish_reason"] == "length"
    assert evs[2]["usage"]["total_tokens"] == 7


def test_in_band_error_event():
    raw = ResponseFormat.error(error_from_fleet("worker_lost", "gone").body())
    assert raw.endswith(SSE_DONE)
    assert events(raw)[0]["error"]["code"] == "worker_lost"
