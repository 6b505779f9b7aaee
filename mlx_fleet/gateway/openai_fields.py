"""The OpenAI request fields that map onto the fleet's decoding controls and tools (pure: no I/O).

Chat completions, legacy completions and the Responses API share these: ``n``, the
penalties, ``logit_bias``, ``logprobs``, ``tools`` / ``tool_choice`` /
``parallel_tool_calls``, ``response_format`` (``text.format`` in the Responses API), and
chat messages that carry tool calls and tool results. Each becomes the ``generate``
field of the contract (docs/protocol.md); a value the fleet cannot honour is an
:class:`OpenAIError` (400) naming the parameter.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from mlx_fleet.gateway.errors import OpenAIError, bad_param

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5  # OpenAI's bound for the completions API's integer logprobs
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# The generate field a fleet refusal names -> the request parameter it came from, by API.
CHAT_PARAMS = {"grammar": "response_format", "max_tokens": "max_tokens", "messages": "messages", "prompt": "prompt",
               "prompt_tokens": "prompt"}
RESPONSES_PARAMS = {"grammar": "text.format", "max_tokens": "max_output_tokens", "messages": "input"}


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def number(body: dict[str, Any], name: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
    """``body[name]`` as a float in [lo, hi] (or (lo, hi]); ``default`` when absent."""
    v = body.get(name)
    if v is None:
        return default
    if not is_num(v) or v > hi or v < lo or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise bad_param(name, f"'{name}' must be a number in {left}{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    """``body[name]`` as an int in [lo, hi]; None when absent."""
    v = body.get(name)
    if v is None:
        return None
    if not is_int(v) or not lo <= v <= hi:
        raise bad_param(name, f"'{name}' must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _boolean(body: dict[str, Any], name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad_param(name, f"'{name}' must be a boolean")
    return v


# ---- decoding controls ---------------------------------------------------------------------


def controls(body: dict[str, Any], *, legacy_logprobs: bool = False) -> dict[str, Any]:
    """``n``, the penalties, ``logit_bias``, ``logprobs`` and the extensions ``min_p`` / ``repetition_penalty``."""
    out: dict[str, Any] = {}
    n = integer(body, "n", 1, MAX_N)
    if n is not None and n != 1:
        out["n"] = n
    for name in ("presence_penalty", "frequency_penalty"):
        value = number(body, name, -2.0, 2.0, 0.0)
        if value:
            out[name] = value
    if body.get("min_p") is not None:
        out["min_p"] = number(body, "min_p", 0.0, 1.0, 0.0)
    if body.get("repetition_penalty") is not None:
        out["repetition_penalty"] = number(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True)
    bias = body.get("logit_bias")
    if bias is not None:
        out.update(_logit_bias(bias))
    out.update(_legacy_logprobs(body) if legacy_logprobs else _chat_logprobs(body))
    return out


def _logit_bias(bias: Any) -> dict[str, Any]:
    if not isinstance(bias, dict):
        raise bad_param("logit_bias", "'logit_bias' must be an object of token id -> bias")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise bad_param("logit_bias", f"'logit_bias' takes at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise bad_param("logit_bias", f"'logit_bias' keys must be token ids (decimal strings), got {key!r}")
        if not is_num(value) or not -100 <= value <= 100:
            raise bad_param("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], got {value!r}")
    return {"logit_bias": {k: float(v) for k, v in bias.items()}} if bias else {}


def _chat_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    logprobs = _boolean(body, "logprobs")
    top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise bad_param("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    out: dict[str, Any] = {}
    if logprobs:
        out["logprobs"] = True
        if top:
            out["top_logprobs"] = top
    return out


def _legacy_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """Completions: ``logprobs`` is how many alternatives per token (0 to 5)."""
    k = integer(body, "logprobs", 0, MAX_LEGACY_LOGPROBS)
    if k is None:
        return {}
    return {"logprobs": True, **({"top_logprobs": k} if k else {})}


# ---- response formats -------------------------------------------------------------------------


def response_format_grammar(value: Any, param: str) -> dict[str, Any] | None:
    """``response_format`` (chat) or ``text.format`` (Responses) as a grammar; None for plain text.

    Chat nests a schema as ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``;
    the Responses API flattens it (``{"type": "json_schema", "name", "schema", "strict"}``).
    """
    if not isinstance(value, dict):
        raise bad_param(param, f"'{param}' must be an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad_param(param, f"'{param}.type' must be text, json_object or json_schema, got {kind!r}")
    spec = value.get("json_schema", value) if param == "response_format" else value
    if not isinstance(spec, dict):
        raise bad_param(param, f"'{param}.json_schema' must be an object")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise bad_param(param, f"'{param}' needs a JSON Schema object in 'schema'")
    _check_schema(schema, param)
    grammar: dict[str, Any] = {"type": "json_schema", "schema": schema}
    strict = spec.get("strict")
    if strict is not None:
        if not isinstance(strict, bool):
            raise bad_param(param, f"'{param}' strict must be a boolean")
        grammar["strict"] = strict
    return grammar


_SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


def _check_schema(schema: Any, param: str, where: str = "schema") -> None:
    """The checks a gateway can make of a JSON Schema (the worker's grammar compiler checks the rest)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise bad_param(param, f"'{param}': {where} must be a JSON Schema object")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in _SCHEMA_TYPES:
            raise bad_param(param, f"'{param}': {where}.type {k!r} is not a JSON Schema type")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise bad_param(param, f"'{param}': {where}.properties must be an object")
        for name, sub in props.items():
            _check_schema(sub, param, f"{where}.properties.{name}")
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise bad_param(param, f"'{param}': {where}.required must be a list of property names")
    if isinstance(schema.get("items"), (dict, bool)):
        _check_schema(schema["items"], param, f"{where}.items")


# ---- tools ----------------------------------------------------------------------------------------


def function_tool(tool: Any, param: str, *, flat: bool = False) -> dict[str, Any]:
    """One function tool in the contract's shape; ``flat`` reads the Responses API's ``{"type", "name", ...}``."""
    fn = tool if flat else (tool.get("function") if isinstance(tool, dict) else None)
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise bad_param(param, f"only function tools are supported, got {kind!r}", "unsupported_parameter")
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise bad_param(param, "a function's name must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
    out: dict[str, Any] = {"name": name}
    if fn.get("description") is not None:
        if not isinstance(fn["description"], str):
            raise bad_param(param, "a function's description must be a string")
        out["description"] = fn["description"]
    if fn.get("parameters") is not None:
        _check_schema(fn["parameters"], param, "parameters")
        out["parameters"] = fn["parameters"]
    if fn.get("strict") is not None:
        out["strict"] = bool(fn["strict"])
    return {"type": "function", "function": out}


def tool_fields(body: dict[str, Any], *, flat: bool = False) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as generate fields."""
    tools_in = body.get("tools")
    tools: list[dict[str, Any]] = []
    if tools_in is not None:
        if not isinstance(tools_in, list) or len(tools_in) > MAX_TOOLS:
            raise bad_param("tools", f"'tools' must be a list of at most {MAX_TOOLS} function tools")
        tools = [function_tool(t, f"tools[{i}]", flat=flat) for i, t in enumerate(tools_in)]
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise bad_param("tools", "function names in 'tools' must be unique")
    choice = _tool_choice(body.get("tool_choice"), [t["function"]["name"] for t in tools], flat=flat)
    parallel = _boolean(body, "parallel_tool_calls")
    out: dict[str, Any] = {}
    if tools and choice != "none":
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
        if parallel is False:
            out["parallel_tool_calls"] = False
    return out


def _tool_choice(value: Any, names: list[str], *, flat: bool) -> str | dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise bad_param("tool_choice", f"'tool_choice' must be auto, none, required or a function, got {value!r}")
        if value == "required" and not names:
            raise bad_param("tool_choice", "'tool_choice': required needs tools")
        return value
    fn = value if flat else (value.get("function") if isinstance(value, dict) else None)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise bad_param("tool_choice", "'tool_choice' names a function as "
                        + ('{"type": "function", "name": ...}' if flat else '{"type": "function", "function": {"name": ...}}'))
    if name not in names:
        raise bad_param("tool_choice", f"'tool_choice' names the function {name!r}, which is not in 'tools'")
    return {"type": "function", "function": {"name": name}}


# ---- chat messages ------------------------------------------------------------------------------


def content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts joined (``input_text`` / ``output_text`` too)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            ok = isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text")
            if not ok or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_param(f"{where}.content", f"only text content parts are supported, got {kind!r}",
                                "unsupported_parameter")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_param(f"{where}.content", "message content must be a string or a list of text parts")


def tool_calls_in(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, checked: arguments must be JSON text."""
    if not isinstance(calls, list):
        raise bad_param(where, "'tool_calls' must be a list")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id", ""), str):
            raise bad_param(f"{where}[{i}]", 'a tool call is {"id", "type": "function", "function": {"name", "arguments"}}')
        args = fn.get("arguments", "{}")
        try:
            if not isinstance(args, str) or not isinstance(json.loads(args), dict):
                raise ValueError
        except ValueError:
            raise bad_param(f"{where}[{i}].function.arguments", "arguments must be a JSON object, as text") from None
        out.append({"id": call.get("id") or f"call_{i}", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def chat_message(m: Any, i: int) -> dict[str, Any]:
    """One chat message as the fleet takes it; tool calls and tool results included."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_param(where, "each message must be an object")
    role = m.get("role")
    if role == "function":
        raise bad_param(f"{where}.role", "the 'function' role is deprecated; use tools and 'tool' messages",
                        "unsupported_parameter")
    if role not in CHAT_ROLES:
        raise bad_param(f"{where}.role", f"role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
    allowed = {"role", "content", "name"} | ({"tool_calls"} if role == "assistant" else set()) \
        | ({"tool_call_id"} if role == "tool" else set())
    for key, v in m.items():
        if key not in allowed and v is not None and not (key in ("tool_calls", "function_call") and v == []):
            raise bad_param(f"{where}.{key}", f"message field {key!r} is not supported", "unsupported_parameter")
    content = m.get("content")
    out: dict[str, Any] = {"role": CHAT_ROLES[role],
                           "content": "" if content is None and role == "assistant" else content_text(content, where)}
    if role == "assistant" and m.get("tool_calls"):
        out["tool_calls"] = tool_calls_in(m["tool_calls"], f"{where}.tool_calls")
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise bad_param(f"{where}.tool_call_id", "a 'tool' message needs the 'tool_call_id' it answers",
                            "missing_required_parameter")
        out["tool_call_id"] = call_id
    return out


def param_of(message: str, params: dict[str, str]) -> str | None:
    """The request parameter a fleet ``bad_request`` names (its message starts ``generate: <field>``)."""
    m = re.match(r"(?:generate: )?([a-z_]+)", message)
    if m is None:
        return None
    return params.get(m.group(1), m.group(1) if m.group(1) in _PASS_THROUGH else None)


_PASS_THROUGH = frozenset({"tools", "tool_choice", "parallel_tool_calls", "logit_bias", "n", "logprobs", "top_logprobs",
                           "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty", "temperature",
                           "top_p", "top_k", "stop", "seed", "response_format"})


def refusal(message: str, params: dict[str, str]) -> OpenAIError:
    """A fleet ``bad_request`` as a 400 naming the request parameter at fault, where the message says."""
    return OpenAIError(400, message.removeprefix("generate: "), param=param_of(message, params), code="bad_request")
