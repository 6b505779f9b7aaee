"""The checks of a ``generate``'s decoding controls and tool fields: values, not only types.

:func:`actors.protocol.validate_generate` calls these after the codec has checked each
field's type; their bounds are in :mod:`actors.messages` and :class:`actors.limits.Limits`.
What only a worker can check (token ids below its vocabulary, a grammar that compiles,
a model that knows a tool format) is checked there, before the request is queued.
"""

from __future__ import annotations

from typing import Any

import msgpack

from actors.limits import DEFAULT_LIMITS, Limits, ProtocolError
from actors.messages import (
    BAD_REQUEST, GRAMMAR_TYPES, MAX_LOGIT_BIAS, MAX_N, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_TOP_LOGPROBS,
    TOOL_CHOICES, Generate,
)


def _bad(msg: Generate, text: str) -> ProtocolError:
    return ProtocolError(BAD_REQUEST, f"generate: {text}", msg.request_id)


def validate_controls(msg: Generate, limits: Limits = DEFAULT_LIMITS) -> None:
    """The decoding controls' bounds: penalties, logit bias, min_p, logprobs, n, grammar. Raises ProtocolError.

    What only a worker can check (token ids below its vocabulary, a grammar that compiles)
    is checked there, before the request is queued.
    """
    rp = msg.repetition_penalty
    if rp is not None and not 0.0 < rp <= MAX_REPETITION_PENALTY:
        raise _bad(msg, f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}]")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -MAX_PENALTY <= getattr(msg, name) <= MAX_PENALTY:
            raise _bad(msg, f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
    if msg.logit_bias is not None:
        _validate_logit_bias(msg, msg.logit_bias, limits)
    if not 0.0 <= msg.min_p <= 1.0:
        raise _bad(msg, "min_p must be in [0, 1]")
    if not 0 <= msg.top_logprobs <= MAX_TOP_LOGPROBS:
        raise _bad(msg, f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}")
    if msg.top_logprobs and not msg.logprobs:
        raise _bad(msg, "top_logprobs needs logprobs: true")
    if not 1 <= msg.n <= MAX_N:
        raise _bad(msg, f"n must be in 1..{MAX_N}")
    if msg.grammar is not None:
        _validate_grammar(msg, msg.grammar, limits)


def parse_logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """``logit_bias`` with int keys (already validated)."""
    return {int(k): float(v) for k, v in bias.items()}


def _validate_logit_bias(msg: Generate, bias: dict[str, Any], limits: Limits) -> None:
    if len(bias) > limits.max_logit_bias_entries:
        raise _bad(msg, f"logit_bias holds {len(bias)} entries; max_logit_bias_entries={limits.max_logit_bias_entries}")
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 10 or int(key) >= 2**31:
            raise _bad(msg, f"logit_bias keys must be decimal token ids; got {key[:32]!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(msg, f"logit_bias[{key}] must be a number")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise _bad(msg, f"logit_bias[{key}] must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")


# The keys each grammar type takes: (required, optional), with their types.
_GRAMMAR_KEYS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "json_schema": ({"schema": dict}, {"strict": bool, "name": str}),
    "json_object": ({}, {}),
    "regex": ({"pattern": str}, {}),
    "lark": ({"grammar": str}, {}),
    "choice": ({"choices": list}, {}),
}


def _validate_grammar(msg: Generate, grammar: dict[str, Any], limits: Limits) -> None:
    kind = grammar.get("type")
    if kind not in GRAMMAR_TYPES:
        raise _bad(msg, f"grammar.type must be one of {', '.join(sorted(GRAMMAR_TYPES))}")
    size = len(msgpack.packb(grammar, use_bin_type=True))
    if size > limits.max_grammar_bytes:
        raise _bad(msg, f"grammar of {size} bytes exceeds max_grammar_bytes={limits.max_grammar_bytes}")
    required, optional = _GRAMMAR_KEYS[kind]
    for key, value in grammar.items():
        if key == "type":
            continue
        want = required.get(key) or optional.get(key)
        if want is None:
            raise _bad(msg, f"grammar of type {kind!r} takes no field {str(key)[:64]!r}")
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise _bad(msg, f"grammar.{key} must be {want.__name__}")
    missing = [k for k in required if k not in grammar]
    if missing:
        raise _bad(msg, f"grammar of type {kind!r} needs {', '.join(missing)}")
    if kind in ("regex", "lark") and not grammar[next(iter(required))]:
        raise _bad(msg, f"grammar.{next(iter(required))} is empty")
    if kind == "choice":
        choices = grammar["choices"]
        if not 1 <= len(choices) <= limits.max_choices:
            raise _bad(msg, f"grammar.choices must hold 1..{limits.max_choices} strings (max_choices)")
        if any(not isinstance(c, str) or not c for c in choices):
            raise _bad(msg, "grammar.choices must be non-empty strings")


def validate_tools(msg: Generate, limits: Limits = DEFAULT_LIMITS) -> None:
    """The tool fields' shape and bounds (OpenAI's function tools). Raises ProtocolError."""
    tools, choice = msg.tools, msg.tool_choice
    names: set[str] = set()
    if tools is not None:
        if len(tools) > limits.max_tools:
            raise _bad(msg, f"tools holds {len(tools)} entries; max_tools={limits.max_tools}")
        size = len(msgpack.packb(tools, use_bin_type=True))
        if size > limits.max_tools_bytes:
            raise _bad(msg, f"tools of {size} bytes exceeds max_tools_bytes={limits.max_tools_bytes}")
        if msg.messages is None:
            raise _bad(msg, "tools needs messages (they are rendered by the model's chat template)")
        for i, tool in enumerate(tools):
            names.add(_tool_name(msg, tool, i))
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise _bad(msg, f"tool_choice must be one of {', '.join(sorted(TOOL_CHOICES))} or a function map")
        if choice != "none" and tools is None:
            raise _bad(msg, f"tool_choice {choice!r} needs tools")
        return
    fn = choice.get("function")
    if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
            or set(choice) != {"type", "function"} or set(fn) != {"name"}:
        raise _bad(msg, 'tool_choice as a map must be {"type": "function", "function": {"name": str}}')
    if fn["name"] not in names:
        raise _bad(msg, f"tool_choice names function {fn['name'][:64]!r}, which is not in tools")


def _tool_name(msg: Generate, tool: dict[str, Any], i: int) -> str:
    """The function name of ``tools[i]`` once its shape is checked."""
    fn = tool.get("function")
    if tool.get("type") != "function" or not isinstance(fn, dict) or set(tool) != {"type", "function"}:
        raise _bad(msg, f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
    name = fn.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not all(c.isascii() and (c.isalnum() or c in "_-")
                                                                       for c in name):
        raise _bad(msg, f"tools[{i}].function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
    extra = set(fn) - {"name", "description", "parameters", "strict"}
    if extra:
        raise _bad(msg, f"tools[{i}].function takes no field {sorted(extra)[0][:64]!r}")
    if "description" in fn and not isinstance(fn["description"], str):
        raise _bad(msg, f"tools[{i}].function.description must be str")
    if "parameters" in fn and not isinstance(fn["parameters"], dict):
        raise _bad(msg, f"tools[{i}].function.parameters must be a map")
    if "strict" in fn and not isinstance(fn["strict"], bool):
        raise _bad(msg, f"tools[{i}].function.strict must be bool")
    return name
