"""The OpenAI surface agents use, with the ``openai`` package against a running fleet on SmolLM2.

``chat`` is the built-in ``smollm2`` model, which gets the shipped ``smollm2-tools`` chat
template and the ``json_tools`` call format. Two demo models stand in for models the fleet
cannot serve tools for: ``plain`` (its template knows no tools, no format configured) and
``mistral`` (a format the fleet has no grammar for). One fleet serves the whole module;
the 20-call checks run their requests concurrently so the worker batches them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI

from actors.config import ModelSpec
from tests.integration.fleets import RunningFleet, make_config
from tests.integration.test_gateway import http
from workers.models.smollm2 import FetchError, smollm2_gguf

pytestmark = [pytest.mark.integration, pytest.mark.real_model, pytest.mark.timeout(600)]

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
               "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Get the current time in a time zone",
                                           "parameters": TIME_PARAMS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Rome", "Quito", "Dakar", "Perth", "Delhi"]
ANSWER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                  "population_millions": {"type": "number"},
                                                  "is_capital": {"type": "boolean"}},
                 "required": ["city", "population_millions", "is_capital"], "additionalProperties": False}
# How many sampled answers a validity check asks for at once: a few in the default run,
# twenty in the slow one.
COUNTS = [4, pytest.param(20, marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def fleet() -> Iterator[RunningFleet]:
    try:
        smollm2_gguf(progress=print)
    except FetchError as exc:
        if os.environ.get("MLX_FLEET_REQUIRE_REAL_MODEL"):
            pytest.fail(f"MLX_FLEET_REQUIRE_REAL_MODEL is set and SmolLM2 is unavailable: {exc}")
        pytest.skip(f"SmolLM2 is unavailable here: {exc}")
    cfg, ipc_dir = make_config(models=(("chat", "smollm2", 1),), gateway=True)
    demo = cfg.models[0].batching
    cfg = dataclasses.replace(cfg, models=(
        *cfg.models, ModelSpec("plain", "demo", 1, demo),
        ModelSpec("mistral", "demo", 1, demo, chat_template="smollm2-tools", tool_format="mistral")))
    with RunningFleet(cfg, ipc_dir) as running:
        yield running


def client(fleet: RunningFleet) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{fleet.cfg.http_port}/v1", api_key="unused", max_retries=0, timeout=300)


def async_client(fleet: RunningFleet) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{fleet.cfg.http_port}/v1", api_key="unused", max_retries=0,
                       timeout=300)


def ask(city: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"What is the weather like in {city} right now?"}]


def valid_call(call: Any, allowed: set[str]) -> dict[str, Any]:
    """The call's arguments, once its name is allowed and its arguments validate against the tool's schema."""
    assert call.type == "function" and call.id and call.function.name in allowed, call
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return dict(args)


# ---- tool calls ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tool_round_trip_not_streamed(fleet: RunningFleet) -> None:
    c = client(fleet)
    messages = ask("Paris")
    first = c.chat.completions.create(model="chat", messages=messages, tools=TOOLS, tool_choice="required",
                                      temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    valid_call(call, {"get_weather", "get_time"})
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "clear"})}]
    final = c.chat.completions.create(model="chat", messages=messages, tools=TOOLS, temperature=0, max_tokens=48)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content


def test_a_tool_round_trip_streamed(fleet: RunningFleet) -> None:
    c = client(fleet)
    messages = ask("Oslo")
    stream = c.chat.completions.create(model="chat", messages=messages, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=80, stream=True)
    calls: dict[int, dict[str, Any]] = {}
    fragments, finish = 0, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            if d.index not in calls:  # id, type and name first
                assert d.id and d.type == "function" and d.function and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function and d.function.name is None
            calls[d.index]["arguments"] += (d.function.arguments if d.function else "") or ""
            fragments += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0] and fragments > 2  # arguments in pieces as generated
    call = calls[0]
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature_c": 4, "sky": "snow"}'}]
    answer = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="chat", messages=messages, tools=TOOLS, temperature=0, max_tokens=48, stream=True) if ch.choices)
    assert answer.strip()


async def _calls(fleet: RunningFleet, tool_choice: Any, count: int) -> list[Any]:
    c = async_client(fleet)
    replies = await asyncio.gather(*[
        c.chat.completions.create(model="chat", messages=ask(CITIES[i % len(CITIES)]), tools=TOOLS,
                                  tool_choice=tool_choice, temperature=0.8, seed=i, max_tokens=80)
        for i in range(count)])
    await c.close()
    return replies


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("tool_choice, allowed", [
    ("required", {"get_weather", "get_time"}),
    pytest.param({"type": "function", "function": {"name": "get_time"}}, {"get_time"}, marks=pytest.mark.slow),
])
def test_forced_calls_are_all_valid(fleet: RunningFleet, tool_choice: Any, allowed: set[str], count: int) -> None:
    replies = asyncio.run(_calls(fleet, tool_choice, count))
    for reply in replies:
        assert reply.choices[0].finish_reason == "tool_calls"
        for call in reply.choices[0].message.tool_calls or []:
            valid_call(call, allowed)
        assert reply.choices[0].message.tool_calls


# ---- response formats, logprobs, n -----------------------------------------------------------------


async def _answers(fleet: RunningFleet, count: int) -> list[Any]:
    c = async_client(fleet)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": ANSWER_SCHEMA, "strict": True}}
    replies = await asyncio.gather(*[
        c.chat.completions.create(model="chat", messages=[{"role": "user", "content": f"Describe {CITIES[i % 10]}."}],
                                  response_format=fmt, temperature=0.8, seed=i, max_tokens=80)  # type: ignore[arg-type]
        for i in range(count)])
    await c.close()
    return replies


@pytest.mark.parametrize("count", COUNTS)
def test_json_schema_answers_all_validate(fleet: RunningFleet, count: int) -> None:
    for reply in asyncio.run(_answers(fleet, count)):
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), ANSWER_SCHEMA)


def test_json_object_streamed_and_on_completions(fleet: RunningFleet) -> None:
    c = client(fleet)
    ask_json = "Reply with a JSON object with two keys, city and country, for Rome."
    text, finish = "", None
    for ch in c.chat.completions.create(model="chat", messages=[{"role": "user", "content": ask_json}],
                                        response_format={"type": "json_object"}, temperature=0, max_tokens=150,
                                        stream=True):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    assert finish == "stop" and isinstance(json.loads(text), dict)
    done = c.completions.create(model="chat", prompt=ask_json + "\n", max_tokens=150, temperature=0,
                                extra_body={"response_format": {"type": "json_object"}})
    assert done.choices[0].finish_reason == "stop" and isinstance(json.loads(done.choices[0].text), dict)


def test_chat_logprobs_streamed_and_not(fleet: RunningFleet) -> None:
    c = client(fleet)
    kwargs: dict[str, Any] = dict(model="chat", messages=[{"role": "user", "content": "Say hi."}], temperature=0,
                                  max_tokens=8, logprobs=True, top_logprobs=3)
    reply = c.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
    assert content and len(content) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    for lp in content:
        assert lp.logprob <= 0 and lp.bytes is not None and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[-1].logprob
        assert lp.token == lp.top_logprobs[0].token  # greedy: the sampled token is the most likely
    streamed = [lp for ch in c.chat.completions.create(**kwargs, stream=True)
                if ch.choices and ch.choices[0].logprobs for lp in ch.choices[0].logprobs.content or []]
    assert [lp.token for lp in streamed] == [lp.token for lp in content]


def test_completion_logprobs_streamed_and_not(fleet: RunningFleet) -> None:
    c = client(fleet)
    done = c.completions.create(model="chat", prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens and len(lp.tokens) == len(lp.token_logprobs or [])
    # The detokenizer drops the leading space of a completion's first token; the tokens keep it.
    assert "".join(lp.tokens).lstrip() == done.choices[0].text.lstrip()
    assert all(len(t) == 2 for t in lp.top_logprobs or [])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed: list[str] = []
    for ch in c.completions.create(model="chat", prompt="The capital of France is", max_tokens=6, temperature=0,
                                   logprobs=2, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.tokens or []
    assert streamed == lp.tokens


def test_logit_bias_with_token_id_keys_and_penalties(fleet: RunningFleet) -> None:
    from mlx_fleet.client import Client

    c = client(fleet)
    plain = c.chat.completions.create(model="chat", messages=ask("Paris"), temperature=0, max_tokens=6)
    with Client(fleet.cfg.frontend, timeout_s=120) as native:
        first = native.generate(model="chat", messages=ask("Paris"), max_tokens=1).token_ids[0]
    banned = c.chat.completions.create(model="chat", messages=ask("Paris"), temperature=0, max_tokens=6,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].message.content != plain.choices[0].message.content
    penalised = c.chat.completions.create(model="chat", messages=ask("Paris"), temperature=0, max_tokens=6,
                                          presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].message.content


def test_n_gives_three_choices(fleet: RunningFleet) -> None:
    c = client(fleet)
    reply = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Name a colour."}], n=3,
                                      temperature=1.0, max_tokens=12)
    assert [ch.index for ch in reply.choices] == [0, 1, 2] and all(ch.message.content for ch in reply.choices)
    seen: dict[int, str] = {}
    for ch in c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Name a colour."}], n=3,
                                        temperature=1.0, max_tokens=12, stream=True):
        for choice in ch.choices:
            seen[choice.index] = seen.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(seen) == [0, 1, 2]


# ---- the Responses API ------------------------------------------------------------------------------

RESPONSE_TOOLS: list[Any] = [{"type": "function", "name": t["function"]["name"],
                              "description": t["function"]["description"], "parameters": t["function"]["parameters"],
                              "strict": True} for t in TOOLS]


@pytest.mark.slow
def test_responses_not_streamed(fleet: RunningFleet) -> None:
    c = client(fleet)
    r = c.responses.create(model="chat", instructions="Be brief.", input="What is the capital of France?",
                           temperature=0, max_output_tokens=24)
    assert r.status == "completed" and r.object == "response" and "Paris" in r.output_text
    assert r.usage is not None and r.usage.output_tokens > 0
    called = c.responses.create(model="chat", input=ask("Lima"), tools=RESPONSE_TOOLS, tool_choice="required",
                                temperature=0, max_output_tokens=80)
    (item,) = [o for o in called.output if o.type == "function_call"]
    jsonschema.validate(json.loads(item.arguments), SCHEMAS[item.name])
    follow = c.responses.create(model="chat", tools=RESPONSE_TOOLS, temperature=0, max_output_tokens=40, input=[
        *ask("Lima"), {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
        {"type": "function_call_output", "call_id": item.call_id, "output": '{"temperature_c": 18}'}])
    assert follow.output_text.strip()
    shaped = c.responses.create(model="chat", input="Describe Rome.", temperature=0, max_output_tokens=80,
                                text={"format": {"type": "json_schema", "name": "city", "schema": ANSWER_SCHEMA,
                                                 "strict": True}})
    jsonschema.validate(json.loads(shaped.output_text), ANSWER_SCHEMA)


def test_responses_streamed_typed_events(fleet: RunningFleet) -> None:
    c = client(fleet)
    kinds: list[str] = []
    text, final = "", None
    for event in c.responses.create(model="chat", input="What is the capital of France?", temperature=0,
                                    max_output_tokens=24, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert {"response.output_item.added", "response.content_part.added", "response.output_text.done",
            "response.output_item.done"} <= set(kinds)
    assert final is not None and final.output_text == text and "Paris" in text
    args, item_done = "", None
    for event in c.responses.create(model="chat", input=ask("Rome"), tools=RESPONSE_TOOLS, tool_choice="required",
                                    temperature=0, max_output_tokens=80, stream=True):
        if event.type == "response.function_call_arguments.delta":
            args += event.delta
        if event.type == "response.output_item.done":
            item_done = event.item
    assert item_done is not None and item_done.type == "function_call" and item_done.arguments == args
    jsonschema.validate(json.loads(args), SCHEMAS[item_done.name])


def get_weather(city: str, unit: str) -> dict[str, Any]:
    """The local function the agent's model asks for."""
    return {"city": city, "unit": unit, "temperature": 21 if unit == "celsius" else 70}


def get_time(timezone: str) -> dict[str, Any]:
    return {"timezone": timezone, "time": "12:00"}


@pytest.mark.slow
def test_an_agent_loop_calls_a_local_function_and_answers(fleet: RunningFleet) -> None:
    """As a user's code runs it: ask, execute each call the model makes, send the results, until it answers."""
    c = client(fleet)
    local = {"get_weather": get_weather, "get_time": get_time}
    messages: list[Any] = ask("Tokyo")
    executed: list[str] = []
    for turn in range(3):
        reply = c.chat.completions.create(model="chat", messages=messages, tools=TOOLS, temperature=0, max_tokens=80,
                                          tool_choice="required" if turn == 0 else "auto")
        message = reply.choices[0].message
        if not message.tool_calls:
            break
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            result = local[call.function.name](**json.loads(call.function.arguments))
            executed.append(call.function.name)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    assert executed and message.content


# ---- refusals, through raw HTTP ---------------------------------------------------------------------


def post(fleet: RunningFleet, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[int, Any]:
    return http(fleet, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})


@pytest.mark.parametrize("model, fields, param, words", [
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice",
     ["get_stock"]),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "thing"}}}},
     "response_format", ["thing"]),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}, "response_format", []),
    ("mistral", {"tools": TOOLS, "tool_choice": "required"}, "tool_choice", ["mistral", "grammar"]),
    ("plain", {"tools": TOOLS}, "tools", ["'plain'", "tool"]),
])
def test_refusals_are_400_naming_the_parameter(fleet: RunningFleet, model: str, fields: dict[str, Any], param: str,
                                               words: list[str]) -> None:
    status, body = post(fleet, {"model": model, "messages": ask("Paris"), "max_tokens": 8, **fields})
    assert status == 400 and body["error"]["param"] == param, body
    assert all(w in body["error"]["message"] for w in words), body


@pytest.mark.parametrize("fields, param", [
    ({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"tools": RESPONSE_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
])
def test_responses_refusals(fleet: RunningFleet, fields: dict[str, Any], param: str) -> None:
    status, body = post(fleet, {"model": "chat", "input": "hi", **fields}, "/v1/responses")
    assert status == 400 and body["error"]["param"] == param, body


def test_the_shipped_template_renders_as_smollm2s_own_without_tools() -> None:
    from mlx_lm import load

    from workers.engine.tool_setup import template_text
    from workers.models.sources import resolve_source

    _, tokenizer = load(str(resolve_source("smollm2")))
    own = tokenizer.chat_template
    for messages in (ask("Paris"), [{"role": "system", "content": "Be brief."}, *ask("Oslo"),
                                    {"role": "assistant", "content": "Sunny."}, *ask("Lima")]):
        for gen in (True, False):
            want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=own)
            got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                                chat_template=template_text("smollm2-tools"))
            assert got == want


def test_the_readme_tour_runs_as_written(fleet: RunningFleet, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's tool call and JSON-schema answer, run as written (against this fleet's port)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code, shown = re.search(r"```python\n(from openai import OpenAI\n.*?tool_choice=\"required\".*?)```\n\n```text\n(.*?)```",
                            readme, re.S).groups()  # type: ignore[union-attr]
    exec(compile(code.replace("http://127.0.0.1:8000/v1", f"http://127.0.0.1:{fleet.cfg.http_port}/v1"), "README", "exec"),
         {})
    call_line, answer_line = capsys.readouterr().out.splitlines()
    want_call, want_answer = shown.splitlines()
    assert call_line == want_call  # greedy, and forced by the grammar
    got, want = json.loads(answer_line), json.loads(want_answer)
    assert set(got) == set(want) and got["city"] == want["city"]


def test_the_http_doc_blocks_on_the_chat_model_run_as_written(fleet: RunningFleet,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """docs/http.md's tool round trip and Responses examples, with the doc's ``client`` pointed at this fleet."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "http.md").read_text()
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", doc, flags=re.M | re.S) if 'model="chat"' in b]
    assert len(blocks) == 2, blocks
    client = OpenAI(base_url=f"http://127.0.0.1:{fleet.cfg.http_port}/v1", api_key="sk-local")
    scope: dict[str, Any] = {"client": client}
    for code in blocks:
        exec(compile(code, "docs/http.md", "exec"), scope)
    assert scope["call"].function.name == "get_weather" and "city" in json.loads(scope["call"].function.arguments)
    assert scope["answer"].choices[0].finish_reason in ("stop", "length")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].strip() and {"response.completed", "response.incomplete"} & set(printed)
