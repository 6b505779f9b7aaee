"""``POST /v1/responses`` requests, stateless (pure: no I/O).

The Responses API as the fleet serves it: ``input`` (a string, or items: messages,
``function_call`` and ``function_call_output``), ``instructions``, function ``tools``,
``tool_choice``, ``parallel_tool_calls``, ``text.format`` (``json_schema``, ``json_object``
or ``text``), ``max_output_tokens``, ``temperature``, ``top_p`` and ``stream``. The items
become chat messages for the model's chat template; a ``function_call`` item is an
assistant turn's tool call, a ``function_call_output`` item a ``tool`` message.

Nothing is stored: ``store: true`` and ``previous_response_id`` are a 400 that says so,
and an ``item_reference`` cannot be resolved. Other fields the fleet cannot honour are a
400 naming them, as in the chat API.
"""

from __future__ import annotations

from typing import Any

from actors.protocol import DEFAULT_LIMITS, Limits
from mlx_fleet.gateway.errors import bad_param
from mlx_fleet.gateway.openai_fields import (
    RESPONSES_PARAMS, CHAT_ROLES, content_text, controls, response_format_grammar, tool_calls_in, tool_fields,
)
from mlx_fleet.gateway.openai_schema import (
    DEFAULT_MAX_TOKENS, EXTENSION_FIELDS, RESPONSES, ParsedRequest, final_check, request_object, sampling,
)

NOT_KEPT = ("mlx-fleet keeps no responses (the Responses API is served statelessly): send the whole conversation "
            "in 'input' each time")
RESPONSES_OWN = frozenset({"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
                           "max_output_tokens", "temperature", "top_p", "stream", "store", "previous_response_id",
                           "metadata", "user", "safety_identifier", "prompt_cache_key", "service_tier", "truncation",
                           "include", "reasoning", "stream_options"})
NEUTRAL: dict[str, tuple[Any, ...]] = {"truncation": ("disabled", "auto"), "include": ([],), "service_tier": ("auto", "default")}


def _check_fields(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if value is None:
            continue
        if name not in RESPONSES_OWN and name not in EXTENSION_FIELDS:
            raise bad_param(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")
        if name in NEUTRAL and value not in NEUTRAL[name]:
            raise bad_param(name, f"'{name}' is not supported by mlx-fleet at {value!r}", "unsupported_parameter")
    if body.get("store") is True:
        raise bad_param("store", f"'store': true is not supported: {NOT_KEPT}; send 'store': false",
                        "unsupported_parameter")
    if body.get("previous_response_id") is not None:
        raise bad_param("previous_response_id", f"'previous_response_id' is not supported: {NOT_KEPT}",
                        "unsupported_parameter")
    reasoning = body.get("reasoning")
    if reasoning is not None and reasoning != {} and any(v is not None for v in reasoning.values()):
        raise bad_param("reasoning", "'reasoning' options are not supported", "unsupported_parameter")


def _item_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise bad_param(f"{where}.role", f"role must be user, system, developer or assistant, got {role!r}")
    return {"role": CHAT_ROLES[role], "content": content_text(item.get("content"), where)}


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    return content_text(output, where)


def input_messages(body: dict[str, Any], limits: Limits) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as chat messages (tool calls and their results included)."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_param("instructions", "'instructions' must be a string")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_param("input", "'input' is required: a string or a non-empty list of items", "missing_required_parameter")
    if len(items) > limits.max_messages:
        raise bad_param("input", f"at most {limits.max_messages} input items are accepted")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_param(where, "each input item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_item_message(item, where))
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            (parsed,) = tool_calls_in([call], where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(parsed)  # the same turn's text and calls
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [parsed]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad_param(f"{where}.call_id", "a function_call_output needs the call_id it answers",
                                "missing_required_parameter")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _output_text(item.get("output"), f"{where}.output")})
        elif kind == "item_reference":
            raise bad_param(where, f"an item_reference cannot be resolved: {NOT_KEPT}", "unsupported_parameter")
        else:
            raise bad_param(f"{where}.type", f"input items of type {kind!r} are not supported (messages, "
                            "function_call and function_call_output are)", "unsupported_parameter")
    return messages


def _text_format(body: dict[str, Any]) -> dict[str, Any] | None:
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_param("text", "'text' must be an object")
    unknown = set(text) - {"format", "verbosity"}
    if unknown:
        raise bad_param("text", f"unknown text field {sorted(unknown)[0]!r}", "unknown_parameter")
    if text.get("verbosity") not in (None, "medium"):
        raise bad_param("text.verbosity", "'text.verbosity' is not supported", "unsupported_parameter")
    fmt = text.get("format")
    return None if fmt is None else response_format_grammar(fmt, "text.format")


def parse_responses_request(body: Any, *, limits: Limits = DEFAULT_LIMITS,
                            default_max_tokens: int = DEFAULT_MAX_TOKENS) -> ParsedRequest:
    """Validate a ``POST /v1/responses`` body. Raises OpenAIError (400)."""
    body = request_object(body)
    _check_fields(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_param("stream", "'stream' must be a boolean")
    options: dict[str, Any] = {"messages": input_messages(body, limits),
                               **sampling(body, limits, default_max_tokens, max_tokens_name="max_output_tokens"),
                               **controls(body), **tool_fields(body, flat=True)}  # controls: the extensions
    grammar = _text_format(body)
    if grammar is not None:
        options["grammar"] = grammar
    parsed = ParsedRequest(RESPONSES, body["model"], bool(stream), False, options, dict(RESPONSES_PARAMS))
    final_check(body["model"], options, limits, parsed.params)
    return parsed
