"""Tool calls on the worker's side: the plan for a request's tool fields, reading calls out of the output,
and the session's chunks and done for a request with tools (a scripted engine, a fake clock)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mlx_lm.tool_parsers import json_tools, mistral

from actors.protocol import Chunk, Done, Error
from tests.unit.test_worker_session import FakeEngine, Rig, make_rig
from workers.engine.interface import StepEvent
from workers.tool_calls import ToolCallStream
from workers.tools import ToolFormat, ToolRequestError, ToolSupport, plan_tools

pytestmark = pytest.mark.timeout(60)

JSON_TOOLS = ToolFormat("json_tools", json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call)
MISTRAL = ToolFormat("mistral", mistral.tool_call_start, mistral.tool_call_end, mistral.parse_tool_call)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
SUPPORT = ToolSupport("chat", JSON_TOOLS)
TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"centre\\""}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


# ---- the plan ----------------------------------------------------------------------------------


@pytest.mark.parametrize("support, tools, choice, parallel, grammar, field, words", [
    (ToolSupport("chat", None, "its chat template has no tools block"), TOOLS, None, True, None, "tools",
     ["'chat'", "no tools block"]),
    (ToolSupport("m", MISTRAL), TOOLS, "required", True, None, "tool_choice", ["'mistral'", "no grammar"]),
    (ToolSupport("m", MISTRAL), TOOLS, None, True, {"type": "json_object"}, "response_format", ["no grammar"]),
    (SUPPORT, TOOLS, {"type": "function", "function": {"name": "nope"}}, True, None, "tool_choice", ["'nope'"]),
    (SUPPORT, TOOLS, "sometimes", True, None, "tool_choice", ["auto, none, required"]),
    (SUPPORT, None, "required", True, None, "tool_choice", ["needs tools"]),
    (SUPPORT, [{"type": "web"}], None, True, None, "tools[0]", ["function"]),
    (SUPPORT, TOOLS, None, True, {"type": "regex", "pattern": "a"}, "response_format", ["regex"]),
])
def test_what_the_model_cannot_honour_is_refused_naming_the_field(support: ToolSupport, tools: Any, choice: Any,
                                                                   parallel: bool, grammar: Any, field: str,
                                                                   words: list[str]) -> None:
    with pytest.raises(ToolRequestError) as info:
        plan_tools(support, tools, choice, parallel, grammar)
    assert info.value.field == field
    assert all(w in str(info.value) for w in words), str(info.value)


def test_no_tools_or_tool_choice_none_gives_the_template_no_tools_and_reads_no_calls() -> None:
    for plan in (plan_tools(SUPPORT, None, None, True, None), plan_tools(SUPPORT, TOOLS, "none", True, None),
                 plan_tools(ToolSupport("chat", None, "why"), TOOLS, "none", True, None)):
        assert plan.template_tools is None and plan.parse is None and plan.grammar is None and plan.stop == []


def test_auto_offers_the_tools_without_a_grammar_and_one_call_stops_at_its_end_marker() -> None:
    auto = plan_tools(SUPPORT, TOOLS, "auto", True, None)
    assert auto.template_tools == TOOLS and auto.parse is JSON_TOOLS and auto.grammar is None and auto.stop == []
    single = plan_tools(SUPPORT, TOOLS, None, False, None)
    assert single.stop == ["</tool_call>"] and single.grammar is None


def test_required_and_named_choices_are_lark_grammars_in_the_models_own_call_format() -> None:
    required = plan_tools(SUPPORT, TOOLS, "required", True, None).grammar
    assert required is not None and required["type"] == "lark"
    text = required["grammar"]
    assert text.splitlines()[0] == "start: calls" and '"<tool_call>"' in text and '"</tool_call>"' in text
    assert "calls: call+" in text and "get_weather" in text and "get_time" in text
    named = plan_tools(SUPPORT, TOOLS, {"type": "function", "function": {"name": "get_time"}}, True, None).grammar
    assert named is not None and "get_weather" not in named["grammar"] and "calls: call\n" in named["grammar"] + "\n"
    either = plan_tools(SUPPORT, TOOLS, "auto", True, {"type": "json_schema", "schema": {"type": "object"}}).grammar
    assert either is not None and either["grammar"].startswith("start: calls | answer")


@pytest.mark.parametrize("choice, grammar", [
    ("required", None), ({"type": "function", "function": {"name": "get_weather"}}, None),
    ("auto", {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}),
    ("auto", {"type": "json_object"}),
])
def test_the_grammars_compile(choice: Any, grammar: Any) -> None:
    """That they force valid calls on a real tokenizer is tested on SmolLM2 (tests/integration/test_openai_tools.py)."""
    llguidance = pytest.importorskip("llguidance")
    plan = plan_tools(SUPPORT, TOOLS, choice, True, grammar)
    assert plan.grammar is not None
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(plan.grammar["grammar"])) == ""


# ---- reading calls -------------------------------------------------------------------------------


def read(fmt: ToolFormat, text: str, step: int) -> tuple[str, list[dict[str, Any]], ToolCallStream]:
    s = ToolCallStream(fmt)
    content, deltas = "", []
    for i in range(0, len(text), step):
        out = s.feed(text[i:i + step])
        content, deltas = content + out.content, deltas + out.deltas
    out = s.finish()
    return content + out.content, deltas + out.deltas, s


def merged(deltas: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"arguments": ""})
        if "id" in d:
            assert call == {"arguments": ""}, "id and name come first, once"
            call.update(id=d["id"], name=d["name"])
        call["arguments"] += d["arguments"]
    return calls


@pytest.mark.parametrize("step", [1, 2, 5, 13, 10_000])
def test_calls_stream_name_first_then_argument_fragments_whatever_the_chunking(step: int) -> None:
    content, deltas, s = read(JSON_TOOLS, TWO_CALLS, step)
    assert content == "Let me check." and s.warning is None
    calls = merged(deltas)
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": 'Paris "centre"'} and json.loads(calls[1]["arguments"]) == {}
    assert [{"id": c["id"], "name": c["name"], "arguments": c["arguments"]} for c in calls.values()] == s.calls
    if step == 1:  # fragments as generated, not one piece at the close
        assert sum(1 for d in deltas if d["index"] == 0 and "id" not in d) > 5


@pytest.mark.parametrize("text, why", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', "cut off"),
    ("<tool_call>\nget_weather(city=Paris)\n</tool_call>", "did not parse"),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}} trailing\n</tool_call>', "did not parse"),
])
def test_a_call_that_does_not_parse_comes_back_as_content_with_a_warning(text: str, why: str) -> None:
    for step in (1, 1000):
        content, _, s = read(JSON_TOOLS, text, step)
        assert content == text and s.calls == []
        assert s.warning is not None and why in s.warning


def test_plain_text_and_marker_lookalikes_are_content() -> None:
    content, deltas, s = read(JSON_TOOLS, "a <tool or <tool_cal and 2 < 3\n", 1)
    assert content == "a <tool or <tool_cal and 2 < 3\n" and deltas == [] and s.warning is None


def test_a_call_the_output_ended_inside_is_read_when_it_parses() -> None:
    """``parallel_tool_calls: false`` stops at the end marker, which the stop string cuts off."""
    content, deltas, s = read(JSON_TOOLS, '<tool_call>\n{"name": "get_time", "arguments": {}}\n', 3)
    assert content == "" and [c["name"] for c in s.calls] == ["get_time"] and s.warning is None


def test_formats_without_an_end_marker_send_each_call_whole_at_the_end() -> None:
    text = '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    content, deltas, s = read(MISTRAL, text, 4)
    assert content == "" and s.warning is None
    calls = merged(deltas)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_time", {}), ("get_weather", {"city": "Oslo"})]


# ---- the session ----------------------------------------------------------------------------------


class StoppingEngine(FakeEngine):
    """The scripted engine, whose sequences end with ``stop`` (EOS) instead of ``length``; messages are its prompt."""

    def encode_prompt(self, prompt: str | None, messages: list[dict] | None, tokens: list[int] | None,
                      tools: list[dict] | None = None) -> list[int]:
        text = "".join(m["content"] for m in messages or [])
        return super().encode_prompt(prompt or text, None, tokens, tools)

    def step(self) -> list[StepEvent]:
        return [StepEvent(e.key, e.text, e.token_ids, "stop" if e.finish_reason == "length" else e.finish_reason,
                          e.first_token, e.completion_tokens, e.cached_tokens, e.path) for e in super().step()]


def tool_rig(pieces: list[str]) -> Rig:
    rig = make_rig(text_of=lambda n: pieces[n])
    engine = StoppingEngine(rig.clock, 4, lambda n: pieces[n])
    engine.tool_support = SUPPORT
    rig.engine = rig.session.engine = engine
    return rig


def pieces_of(text: str, size: int = 4) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("stream", [True, False])
def test_a_session_streams_tool_call_deltas_and_ends_with_tool_calls(stream: bool) -> None:
    pieces = pieces_of(TWO_CALLS)
    rig = tool_rig(pieces)
    messages = [{"role": "user", "content": "weather?"}]
    assert rig.dispatch("t1", prompt=None, messages=messages, tools=TOOLS, max_tokens=len(pieces), stream=stream) == []
    assert rig.engine.rendered_tools == [TOOLS]
    out = rig.run()
    done = out[-1]
    assert isinstance(done, Done) and done.finish_reason == "tool_calls" and done.warning is None
    assert [c["name"] for c in done.tool_calls or []] == ["get_weather", "get_time"]
    chunks = [m for m in out if isinstance(m, Chunk)]
    if stream:
        assert "".join(c.text for c in chunks) == "Let me check."
        streamed = merged([d for c in chunks for d in c.tool_calls or []])
        assert [{"id": c["id"], "name": c["name"], "arguments": c["arguments"]} for c in streamed.values()] \
            == done.tool_calls
    else:
        assert chunks == [] and done.text == "Let me check."


def test_a_session_refuses_tools_the_model_cannot_call_before_queueing_it() -> None:
    rig = make_rig()
    (err,) = rig.dispatch("t2", prompt=None, messages=[{"role": "user", "content": "x"}], tools=TOOLS)
    assert isinstance(err, Error) and err.code == "bad_request" and err.message.startswith("generate: tools:")
    assert rig.session.in_flight == 0


def test_parallel_tool_calls_false_adds_the_end_marker_as_a_stop_string() -> None:
    rig = tool_rig(pieces_of("hello there"))
    rig.dispatch("t3", prompt=None, messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                 parallel_tool_calls=False, stop=["END"])
    rig.turn()
    (seq,) = rig.engine.seqs.values()
    assert seq.req.stop == ["END", "</tool_call>"]
