"""The gateway's mapping of what agents send (tools, tool_choice, response formats, logprobs, n, penalties, the
Responses API) onto generate fields, and the reply shapes built from the fleet's answers. Pure: no sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mlx_fleet.client import Choice, Completion, StreamChunk
from mlx_fleet.gateway.openai_fields import param_of, refusal
from mlx_fleet.gateway.openai_responses import ResponseFormat
from mlx_fleet.gateway.openai_schema import CHAT, COMPLETION, OpenAIError, parse_chat_request, parse_completion_request
from mlx_fleet.gateway.responses_api import ResponsesFormat, parse_responses_request

pytestmark = pytest.mark.timeout(30)

MSG = [{"role": "user", "content": "Hi"}]
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": PARAMS}}
FLAT_TOOL = {"type": "function", "name": "get_weather", "description": "Weather", "parameters": PARAMS, "strict": True}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, **fields}


# ---- requests -------------------------------------------------------------------------------------


def test_decoding_controls_map_onto_generate_fields() -> None:
    o = parse_chat_request(chat(n=3, presence_penalty=0.5, frequency_penalty=-1, logit_bias={"42": -100, "7": 2.5},
                                logprobs=True, top_logprobs=4, min_p=0.05, repetition_penalty=1.1)).options
    assert (o["n"], o["presence_penalty"], o["frequency_penalty"], o["logprobs"], o["top_logprobs"]) == (3, 0.5, -1.0, True, 4)
    assert o["logit_bias"] == {"42": -100.0, "7": 2.5} and o["min_p"] == 0.05 and o["repetition_penalty"] == 1.1
    neutral = parse_chat_request(chat(n=1, presence_penalty=0, logit_bias={}, logprobs=False, top_logprobs=0)).options
    assert not {"n", "presence_penalty", "logit_bias", "logprobs", "top_logprobs"} & set(neutral)


def test_completions_logprobs_is_how_many_alternatives() -> None:
    assert parse_completion_request({"model": "m", "prompt": "x", "logprobs": 3}).options["top_logprobs"] == 3
    zero = parse_completion_request({"model": "m", "prompt": "x", "logprobs": 0}).options
    assert zero["logprobs"] is True and "top_logprobs" not in zero


def test_tools_tool_choice_and_parallel_calls_map_as_the_contract_says() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    o = parse_chat_request(chat(tools=[TOOL], tool_choice=named, parallel_tool_calls=False)).options
    assert o["tools"] == [TOOL] and o["tool_choice"] == named and o["parallel_tool_calls"] is False
    assert "tool_choice" not in parse_chat_request(chat(tools=[TOOL])).options
    none = parse_chat_request(chat(tools=[TOOL], tool_choice="none")).options
    assert "tools" not in none and "tool_choice" not in none  # none: the template gets no tools


@pytest.mark.parametrize("fmt, grammar", [
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": PARAMS, "strict": True}},
     {"type": "json_schema", "schema": PARAMS, "strict": True}),
])
def test_response_format_becomes_a_grammar(fmt: dict[str, Any], grammar: Any) -> None:
    assert parse_chat_request(chat(response_format=fmt)).options.get("grammar") == grammar


def test_tool_calls_and_tool_results_in_the_history() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*MSG, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"c": 21}'}]
    got = parse_chat_request(chat(messages=messages, tools=[TOOL])).options["messages"]
    assert got[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert got[2] == {"role": "tool", "content": '{"c": 21}', "tool_call_id": "call_1"}
    bad = [*MSG, {"role": "assistant", "tool_calls": [{**call, "function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(OpenAIError) as info:
        parse_chat_request(chat(messages=bad))
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"


def test_responses_input_items_become_chat_messages() -> None:
    body = {"model": "m", "instructions": "Be brief.", "tools": [FLAT_TOOL], "tool_choice": "required",
            "text": {"format": {"type": "json_schema", "name": "c", "schema": PARAMS}}, "max_output_tokens": 50,
            "store": False, "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "21C"}]}
    p = parse_responses_request(body)
    o = p.options
    assert [m["role"] for m in o["messages"]] == ["system", "user", "assistant", "tool"]
    assert o["messages"][2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert o["messages"][3] == {"role": "tool", "tool_call_id": "c1", "content": "21C"}
    assert o["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                            "parameters": PARAMS, "strict": True}}]
    assert o["tool_choice"] == "required" and o["max_tokens"] == 50 and o["grammar"]["schema"] == PARAMS


@pytest.mark.parametrize("fields, param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [FLAT_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "thing"}}}}, "text.format"),
    ({"temperature": 3}, "temperature"),
    ({"stop": ["x"]}, "stop"),
    ({"input": []}, "input"),
])
def test_responses_refusals_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_responses_request({"model": "m", "input": "hi", **fields})
    assert (info.value.status, info.value.param) == (400, param)


@pytest.mark.parametrize("message, params, param", [
    ("generate: grammar: the schema does not compile", {"grammar": "response_format"}, "response_format"),
    ("generate: grammar: the schema does not compile", {"grammar": "text.format"}, "text.format"),
    ("generate: tool_choice: model 'x' has no grammar", {}, "tool_choice"),
    ("generate: tools: model 'x' cannot call tools", {}, "tools"),
    ("generate: logit_bias keys must be below the vocabulary", {}, "logit_bias"),
    ("ValueError: the prompt is empty", {}, None),
])
def test_a_fleet_refusal_names_the_parameter_it_came_from(message: str, params: dict[str, str], param: Any) -> None:
    assert param_of(message, params) == param
    err = refusal(message, params)
    assert err.status == 400 and err.param == param and not err.message.startswith("generate: ")


# ---- replies --------------------------------------------------------------------------------------

USAGE = {"prompt_tokens": 5, "completion_tokens": 4}
LP = [{"token": "Hi", "token_id": 1, "logprob": -0.1, "bytes": [72, 105],
       "top_logprobs": [{"token": "Hi", "token_id": 1, "logprob": -0.1, "bytes": [72, 105]},
                        {"token": "Yo", "token_id": 2, "logprob": -2.5, "bytes": [89, 111]}]},
      {"token": "!", "token_id": 3, "logprob": -0.3, "bytes": [33], "top_logprobs": []}]
CALL = {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}


def sse(raw: bytes) -> list[Any]:
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        data = block.split("data: ", 1)[1]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_body_with_tool_calls_logprobs_and_a_warning() -> None:
    done = Completion("r", "", [], "tool_calls", USAGE, tool_calls=[CALL], logprobs=LP, warning="tool call 1 did not parse")
    body = ResponseFormat(CHAT, completion_id="c", model="m", created_s=1).full(done)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert choice["logprobs"]["content"][0] == {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}, {"token": "Yo", "logprob": -2.5, "bytes": [89, 111]}]}
    assert body["warning"] == "tool call 1 did not parse"


def test_n_choices_and_legacy_logprobs() -> None:
    choices = [Choice(i, f"t{i}", [], "stop", 2, LP) for i in range(3)]
    done = Completion("r", "t0", [], "stop", USAGE, choices=choices)
    body = ResponseFormat(COMPLETION, completion_id="c", model="m", created_s=1, n=3, top_logprobs=True).full(done)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2] and body["choices"][2]["text"] == "t2"
    assert body["choices"][0]["logprobs"] == {"tokens": ["Hi", "!"], "token_logprobs": [-0.1, -0.3],
                                              "top_logprobs": [{"Hi": -0.1, "Yo": -2.5}, {}], "text_offset": [0, 2]}


def test_streamed_tool_call_deltas_name_first_then_fragments() -> None:
    fmt = ResponseFormat(CHAT, completion_id="c", model="m", created_s=1)
    raw = fmt.start() + fmt.chunk(StreamChunk("", [5], tool_calls=[{"index": 0, "id": "call_1", "name": "get_weather",
                                                                     "arguments": ""}]))
    raw += fmt.chunk(StreamChunk("", [6], tool_calls=[{"index": 0, "arguments": '{"city": '}]))
    raw += fmt.chunk(StreamChunk("", [], tool_calls=[{"index": 0, "arguments": '"Paris"}'}]))
    raw += fmt.finish(Completion("r", "", [], "tool_calls", USAGE))
    evs = sse(raw)
    deltas = [e["choices"][0]["delta"]["tool_calls"][0] for e in evs[1:4]]
    assert deltas[0] == {"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
    assert deltas[1] == {"index": 0, "function": {"arguments": '{"city": '}}
    assert evs[4]["choices"][0]["finish_reason"] == "tool_calls" and evs[-1] == "[DONE]"


def test_streamed_n_choices_each_open_and_finish() -> None:
    fmt = ResponseFormat(CHAT, completion_id="c", model="m", created_s=1, n=2)
    raw = fmt.start() + fmt.chunk(StreamChunk("a", [1], index=1)) + fmt.chunk(StreamChunk("b", [2], index=0))
    raw += fmt.finish(Completion("r", "", [], "stop", USAGE, choices=[Choice(0, "", [], "stop"), Choice(1, "", [], "length")]))
    evs = [e for e in sse(raw) if e != "[DONE]"]
    assert [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in evs] == [
        (0, None), (1, None), (1, None), (0, None), (0, "stop"), (1, "length")]


def responses_fmt(**fields: Any) -> ResponsesFormat:
    body = {"model": "m", "input": "hi", **fields}
    return ResponsesFormat(body, parse_responses_request(body), response_id="resp_1", created_s=1)


def test_responses_object_with_text_and_a_function_call() -> None:
    r = responses_fmt(tools=[FLAT_TOOL]).full(Completion("r", "Checking.", [], "tool_calls", USAGE, tool_calls=[CALL]))
    assert r["object"] == "response" and r["status"] == "completed" and r["store"] is False
    message, call = r["output"]
    assert message["type"] == "message" and message["content"][0]["text"] == "Checking."
    assert (call["type"], call["call_id"], call["name"], call["arguments"]) == (
        "function_call", "call_1", "get_weather", '{"city": "Paris"}')
    assert r["usage"]["input_tokens"] == 5 and r["usage"]["total_tokens"] == 9
    assert r["tools"][0]["name"] == "get_weather"
    cut = responses_fmt().full(Completion("r", "long", [], "length", USAGE))
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}


def test_responses_stream_events_in_order() -> None:
    fmt = responses_fmt(tools=[FLAT_TOOL])
    raw = fmt.start() + fmt.chunk(StreamChunk("Let me ", [1])) + fmt.chunk(StreamChunk("see.", [2]))
    raw += fmt.chunk(StreamChunk("", [3], tool_calls=[{"index": 0, "id": "call_1", "name": "get_weather",
                                                       "arguments": ""}]))
    raw += fmt.chunk(StreamChunk("", [4], tool_calls=[{"index": 0, "arguments": '{"city": "Paris"}'}]))
    raw += fmt.finish(Completion("r", "", [], "tool_calls", USAGE, tool_calls=[CALL]))
    evs = sse(raw)
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    final = evs[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me see." and final["output"][1]["arguments"] == '{"city": "Paris"}'
    failed = sse(responses_fmt().error({"error": {"code": "worker_lost", "message": "gone", "param": None}}))
    assert [e["type"] for e in failed] == ["error", "response.failed"]
