"""Tool calls on the worker's side: what a request's tools mean for decoding, and reading calls out of the output.

Pure: no MLX. The model's tool-call format (:class:`ToolFormat`: the text that opens and
closes a call, and mlx-lm's parser for what lies between) comes from
:mod:`workers.engine.tool_setup`; the worker's session uses what is here:

- :func:`plan_tools` checks a request's ``tools``, ``tool_choice`` and
  ``parallel_tool_calls`` against the model and says what decoding needs: the tools the
  chat template renders, a grammar that forces a call (``tool_choice`` required or
  named, or a response format beside tools), and a stop string that ends the output
  after one call (``parallel_tool_calls: false``). What the model cannot honour raises
  :class:`ToolRequestError` naming the field.
- :class:`workers.tool_calls.ToolCallStream` reads the calls out of the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

# A tool parser as mlx-lm ships them: (call text, tools) -> one call or a list of calls,
# each {"name": str, "arguments": dict | str, "id"?: str}; raises ValueError when the text is no call.
ToolParser = Callable[[str, Any], Any]
JSON_TOOLS = "json_tools"  # Hermes style: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
GRAMMAR_FORMATS = frozenset({JSON_TOOLS})  # formats whose calls a grammar can force (tool_choice required/named)


class ToolRequestError(ValueError):
    """A request's tool fields that this model cannot honour; ``field`` names the one at fault."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls: ``call_start`` ... ``call_end`` ("" : to the end of the output)."""

    name: str
    call_start: str
    call_end: str
    parse: ToolParser


@dataclass(frozen=True)
class ToolSupport:
    """A model's tool calling: its format, or why it has none (then ``tools`` is refused with ``why``)."""

    model: str
    format: ToolFormat | None = None
    why: str = ""


@dataclass
class ToolPlan:
    """What a request's tool fields mean for its decoding."""

    template_tools: list[dict[str, Any]] | None = None  # given to the chat template (None: no tools block)
    grammar: dict[str, Any] | None = None  # replaces the request's grammar when set
    stop: list[str] = field(default_factory=list)  # added to the request's stop strings
    parse: ToolFormat | None = None  # read calls out of the output with this format


def _tool_names(tools: list[dict[str, Any]]) -> list[str]:
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolRequestError(f"tools[{i}]", 'each tool must be {"type": "function", "function": {"name": ...}}')
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolRequestError(f"tools[{i}].function.parameters", "parameters must be a JSON Schema object")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise ToolRequestError("tools", "tool names must be unique")
    return names


def chosen_tool(tool_choice: Any, names: list[str]) -> str | None:
    """The function a named ``tool_choice`` forces (None for a string choice); an unknown name raises."""
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ToolRequestError("tool_choice", f"tool_choice must be auto, none, required or a named function, "
                                   f"got {tool_choice!r}")
        return None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ToolRequestError("tool_choice", 'a named tool_choice is {"type": "function", "function": {"name": ...}}')
    if name not in names:
        raise ToolRequestError("tool_choice", f"tool_choice names {name!r}, which is not among the tools given "
                               f"({', '.join(names) or 'none'})")
    return name


def plan_tools(support: ToolSupport, tools: list[dict[str, Any]] | None, tool_choice: Any,
               parallel_tool_calls: bool, grammar: dict[str, Any] | None) -> ToolPlan:
    """What decoding needs for a request's tool fields; raises ToolRequestError naming the field at fault."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolRequestError("tool_choice", "tool_choice needs tools")
        return ToolPlan()
    names = _tool_names(tools)
    choice = "auto" if tool_choice is None else tool_choice
    forced = chosen_tool(choice, names)
    if choice == "none":
        return ToolPlan()  # no tools block: the model is not told of them, and its text is not read as calls
    fmt = support.format
    if fmt is None:
        raise ToolRequestError("tools", f"model {support.model!r} cannot call tools: {support.why}")
    must_call = choice == "required" or forced is not None
    plan = ToolPlan(template_tools=tools, parse=fmt)
    if must_call or grammar is not None:
        if fmt.name not in GRAMMAR_FORMATS:
            what = "tool_choice" if must_call else "response_format"
            raise ToolRequestError(what, f"model {support.model!r} writes tool calls as {fmt.name!r}, for which the "
                                   f"fleet has no grammar; {'forcing a call' if must_call else 'a response format beside tools'} "
                                   f"needs one (formats with a grammar: {', '.join(sorted(GRAMMAR_FORMATS))})")
        allowed = [t for t in tools if t["function"]["name"] == forced] if forced else tools
        # A named choice is one call of that function; otherwise as many as parallel_tool_calls allows.
        plan.grammar = json_tools_grammar(fmt, allowed, parallel=parallel_tool_calls and forced is None,
                                          answer=None if must_call else grammar)
    elif not parallel_tool_calls and fmt.call_end:
        plan.stop = [fmt.call_end]  # the output ends with the first call
    return plan


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def _answer_rule(answer: dict[str, Any]) -> str:
    """The Lark rule of a response format (json_schema or json_object) offered beside the calls."""
    kind = answer.get("type")
    if kind == "json_schema":
        return "%json" + json.dumps(answer.get("schema", {}))
    if kind == "json_object":
        return '%json{"type": "object"}'
    raise ToolRequestError("response_format", f"a {kind!r} grammar cannot be combined with tools")


def json_tools_grammar(fmt: ToolFormat, tools: list[dict[str, Any]], *, parallel: bool,
                       answer: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Lark grammar (llguidance) for ``json_tools`` calls to ``tools``: one call, or one or more when
    ``parallel``; with ``answer`` (a response format), either calls or that answer."""
    schemas = [_call_schema(t) for t in tools]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    # Calls follow each other with nothing between: after a call's end marker the model may only
    # open another call or stop (a newline there would let a small model run on call after call).
    lines = [f"call: {json.dumps(fmt.call_start)} \"\\n\" %json{json.dumps(body)} \"\\n\" {json.dumps(fmt.call_end)}",
             "calls: call+" if parallel else "calls: call"]
    lines.insert(0, "start: calls | answer" if answer is not None else "start: calls")
    if answer is not None:
        lines.append(f"answer: {_answer_rule(answer)}")
    return {"type": "lark", "grammar": "\n".join(lines)}
