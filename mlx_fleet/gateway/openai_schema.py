"""OpenAI request parsing and error mapping for the HTTP gateway (pure: no I/O).

A request body becomes a :class:`ParsedRequest` whose ``options`` are the
fields of a protocol ``generate`` message, or an :class:`OpenAIError` (HTTP 400)
that names the offending parameter. Every parameter of OpenAI's chat and
legacy completions APIs falls in one of four groups:

- supported: translated to the fleet's sampling options;
- ignored (``IGNORED_FIELDS``): metadata that cannot change the output;
- neutral-only (``CHAT_NEUTRAL`` / ``COMPLETION_NEUTRAL``): accepted only at the
  value that changes nothing (``n=1``, ``logprobs=false``...), else a 400;
- anything else: a 400 ``unknown_parameter``, as OpenAI answers.

``null`` is the same as leaving a field out. ``docs/http.md`` lists the groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.protocol import (
    BAD_REQUEST, CANCELLED, DEFAULT_LIMITS, DUPLICATE_REQUEST, ERROR_CODES, INTERNAL, OVER_BUDGET, OVERLOADED, PRIORITIES, TIMEOUT,
    UNAVAILABLE, UNKNOWN_MODEL, WORKER_LOST, Generate, Limits, ProtocolError, validate_generate,
)

CHAT = "chat"
COMPLETION = "completion"
DEFAULT_MAX_TOKENS = 512  # as mlx_lm.server; OpenAI's own default is "until the context is full"
DEFAULT_TEMPERATURE = 1.0  # OpenAI's documented default
MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class OpenAIError(Exception):
    """An HTTP error answered in OpenAI's JSON error format."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_param(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    """A 400 about one request parameter."""
    return OpenAIError(400, message, param=param, code=code)


# ---- fleet error codes -> HTTP ----------------------------------------------------

# code -> (HTTP status, OpenAI error type, OpenAI error code)
FLEET_ERRORS: dict[str, tuple[int, str, str]] = {
    BAD_REQUEST: (400, "invalid_request_error", "bad_request"),
    UNKNOWN_MODEL: (404, "invalid_request_error", "model_not_found"),
    OVERLOADED: (429, "rate_limit_error", "overloaded"),
    TIMEOUT: (504, "timeout_error", "timeout"),
    UNAVAILABLE: (503, "service_unavailable_error", "unavailable"),
    OVER_BUDGET: (503, "service_unavailable_error", "over_budget"),
    # The worker died after the request reached it: the upstream failed mid-request.
    WORKER_LOST: (502, "server_error", "worker_lost"),
    # The fleet cancelled it, not this HTTP client (a drain, an operator): retryable.
    CANCELLED: (503, "service_unavailable_error", "cancelled"),
    INTERNAL: (500, "server_error", "internal"),
    # Another request with this id is in flight from the same client (the gateway's ids are fresh).
    DUPLICATE_REQUEST: (409, "invalid_request_error", "duplicate_request"),
    # Raised locally by the client library: an answer from the broker it cannot decode.
    "bad_reply": (502, "server_error", "bad_reply"),
}
_UNMAPPED = ERROR_CODES - FLEET_ERRORS.keys()
if _UNMAPPED:  # import-time check: every protocol error code has an HTTP status
    raise RuntimeError(f"openai_schema: no HTTP mapping for fleet error codes {sorted(_UNMAPPED)}")


def error_from_fleet(code: str, message: str) -> OpenAIError:
    """The HTTP error for a fleet error code (unknown codes are a 500)."""
    status, etype, ecode = FLEET_ERRORS.get(code, (500, "server_error", code))
    return OpenAIError(status, message, type=etype, param="model" if code == UNKNOWN_MODEL else None, code=ecode)


# ---- requests ------------------------------------------------------------------------


@dataclass
class ParsedRequest:
    """A validated OpenAI request. ``options`` are ``generate`` fields (model excluded)."""

    kind: str  # CHAT | COMPLETION
    model: str
    stream: bool
    include_usage: bool
    options: dict[str, Any] = field(default_factory=dict)


IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention", "parallel_tool_calls",
})
# mlx-fleet extensions (send them with the openai package's ``extra_body``).
EXTENSION_FIELDS = frozenset({"top_k", "timeout_s", "priority"})
SAMPLING_FIELDS = frozenset({"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed"})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


Neutral = tuple[Callable[[Any], bool], str]
_ZERO: Neutral = (lambda v: _is_num(v) and v == 0, "only 0 is supported")
_SHARED_NEUTRAL: dict[str, Neutral] = {
    "n": (lambda v: _is_int(v) and v == 1, "only n=1 is supported"),
    "presence_penalty": _ZERO,
    "frequency_penalty": _ZERO,
    "logit_bias": (lambda v: v == {}, "logit_bias is not supported"),
}
CHAT_NEUTRAL: dict[str, Neutral] = {
    **_SHARED_NEUTRAL,
    "logprobs": (lambda v: v is False, "logprobs are not supported"),
    "top_logprobs": (lambda v: _is_int(v) and v == 0, "logprobs are not supported"),
    "tools": (lambda v: v == [], "tools (function calling) are not supported"),
    "tool_choice": (lambda v: v == "none", "tools (function calling) are not supported"),
    "functions": (lambda v: v == [], "function calling is not supported"),
    "function_call": (lambda v: v == "none", "function calling is not supported"),
    "response_format": (lambda v: v == {"type": "text"}, "only response_format {\"type\": \"text\"} is supported"),
    "modalities": (lambda v: v == ["text"], "only the text modality is supported"),
    "audio": (lambda v: False, "audio output is not supported"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "web_search_options": (lambda v: False, "web search is not supported"),
    "reasoning_effort": (lambda v: False, "reasoning_effort is not supported"),
    "verbosity": (lambda v: False, "verbosity is not supported"),
}
COMPLETION_NEUTRAL: dict[str, Neutral] = {
    **_SHARED_NEUTRAL,
    "logprobs": (lambda v: _is_int(v) and v == 0, "logprobs are not supported"),
    "best_of": (lambda v: _is_int(v) and v == 1, "only best_of=1 is supported"),
    "echo": (lambda v: v is False, "echo is not supported"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported"),
}


def _check_fields(body: dict[str, Any], own: frozenset[str], neutral: dict[str, Neutral]) -> None:
    for name, value in body.items():
        if value is None or name in own or name in SAMPLING_FIELDS or name in IGNORED_FIELDS or name in EXTENSION_FIELDS:
            continue
        rule = neutral.get(name)
        if rule is None:
            raise bad_param(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")
        ok, why = rule
        if not ok(value):
            raise bad_param(name, f"'{name}' is not supported by mlx-fleet: {why}", "unsupported_parameter")


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v) or v > hi or v < lo or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise bad_param(name, f"'{name}' must be a number in {left}{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or not lo <= v <= hi:
        raise bad_param(name, f"'{name}' must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _sampling(body: dict[str, Any], kind: str, limits: Limits, default_max_tokens: int) -> dict[str, Any]:
    """max_tokens, temperature, top_p, stop, seed and the extensions, as generate fields."""
    hi = limits.max_tokens_limit
    max_tokens = _int(body, "max_tokens", 1, hi)
    if kind == CHAT:
        newer = _int(body, "max_completion_tokens", 1, hi)
        if newer is not None and max_tokens is not None and newer != max_tokens:
            raise bad_param("max_completion_tokens", "give max_completion_tokens or max_tokens, not both with different values")
        max_tokens = newer if newer is not None else max_tokens
    out: dict[str, Any] = {
        "max_tokens": max_tokens if max_tokens is not None else default_max_tokens,
        "temperature": _number(body, "temperature", 0.0, MAX_TEMPERATURE, DEFAULT_TEMPERATURE),
        "top_p": _number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
    }
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad_param("stop", "'stop' must be a non-empty string or a list of non-empty strings")
        if len(stops) > limits.max_stop_strings or any(len(s) > limits.max_stop_chars for s in stops):
            raise bad_param("stop", f"'stop' takes at most {limits.max_stop_strings} strings of at most {limits.max_stop_chars} characters")
        if stops:
            out["stop"] = list(dict.fromkeys(stops))
    seed = _int(body, "seed", 0, 2**63 - 1)
    if seed is not None:
        out["seed"] = seed
    top_k = _int(body, "top_k", 0, 2**31 - 1)
    if top_k is not None:
        out["top_k"] = top_k
    if body.get("timeout_s") is not None:
        out["timeout_s"] = _number(body, "timeout_s", 0.0, 86_400.0, 0.0, lo_open=True)
    priority = body.get("priority")
    if priority is not None:
        if priority not in PRIORITIES:
            raise bad_param("priority", f"'priority' must be one of {', '.join(PRIORITIES)}")
        out["priority"] = priority
    return out


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_param("stream", "'stream' must be a boolean")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad_param("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    if not isinstance(opts, dict):
        raise bad_param("stream_options", "'stream_options' must be an object")
    unknown = set(opts) - {"include_usage", "include_obfuscation"}
    if unknown:
        raise bad_param("stream_options", f"unknown stream_options field {sorted(unknown)[0]!r}", "unknown_parameter")
    include_usage = opts.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad_param("stream_options", "'stream_options.include_usage' must be a boolean")
    return stream, bool(include_usage)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_param("model", "'model' is required and must be a non-empty string", "missing_required_parameter")
    return body


def _final_check(model: str, options: dict[str, Any], limits: Limits) -> None:
    """The protocol's own bounds, so the broker never refuses what we accepted."""
    try:
        validate_generate(Generate(request_id="check", model=model, **options), limits)
    except ProtocolError as exc:
        raise OpenAIError(400, exc.message.removeprefix("generate: "), code="invalid_value") from None
    if len(model) > limits.max_id_chars:
        raise bad_param("model", f"'model' longer than {limits.max_id_chars} characters")


def _content_text(content: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_param(f"messages[{i}].content", f"only text content parts are supported, got {kind!r}", "unsupported_parameter")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_param(f"messages[{i}].content", "message content must be a string or a list of text parts")


def _messages(value: Any, limits: Limits) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_param("messages", "'messages' is required and must be a non-empty list", "missing_required_parameter")
    if len(value) > limits.max_messages:
        raise bad_param("messages", f"at most {limits.max_messages} messages are accepted")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise bad_param(f"messages[{i}]", "each message must be an object")
        role = m.get("role")
        if role in ("tool", "function"):
            raise bad_param(f"messages[{i}].role", f"role {role!r} needs function calling, which is not supported", "unsupported_parameter")
        if role not in CHAT_ROLES:
            raise bad_param(f"messages[{i}].role", f"role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        for key, v in m.items():
            if key in ("role", "content", "name") or v is None:
                continue
            if key in ("tool_calls", "function_call") and v == []:
                continue
            raise bad_param(f"messages[{i}].{key}", f"message field {key!r} is not supported", "unsupported_parameter")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append({"role": CHAT_ROLES[role], "content": _content_text(content, i)})
    return out


def parse_chat_request(body: Any, *, limits: Limits = DEFAULT_LIMITS,
                       default_max_tokens: int = DEFAULT_MAX_TOKENS) -> ParsedRequest:
    """Validate a ``POST /v1/chat/completions`` body. Raises OpenAIError (400)."""
    body = _object(body)
    _check_fields(body, frozenset({"messages", "max_completion_tokens"}), CHAT_NEUTRAL)
    stream, include_usage = _stream_flags(body)
    options = {"messages": _messages(body.get("messages"), limits), **_sampling(body, CHAT, limits, default_max_tokens)}
    _final_check(body["model"], options, limits)
    return ParsedRequest(CHAT, body["model"], stream, include_usage, options)


def _prompt(value: Any, limits: Limits) -> dict[str, Any]:
    """A completions prompt: a string, or token ids; a one-element list of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return {"prompt": value}
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        if any(not 0 <= t < 2**31 for t in value):
            raise bad_param("prompt", "token ids in 'prompt' must be non-negative")
        return {"prompt_tokens": list(value)}
    if isinstance(value, list) and len(value) > 1:
        raise bad_param("prompt", "only one prompt per request is supported (send one request per prompt)", "unsupported_parameter")
    raise bad_param("prompt", "'prompt' must be a string, a list of token ids, or a one-element list of either",
                    "missing_required_parameter" if value is None else "invalid_value")


def parse_completion_request(body: Any, *, limits: Limits = DEFAULT_LIMITS,
                             default_max_tokens: int = DEFAULT_MAX_TOKENS) -> ParsedRequest:
    """Validate a ``POST /v1/completions`` body. Raises OpenAIError (400)."""
    body = _object(body)
    _check_fields(body, frozenset({"prompt"}), COMPLETION_NEUTRAL)
    stream, include_usage = _stream_flags(body)
    options = {**_prompt(body.get("prompt"), limits), **_sampling(body, COMPLETION, limits, default_max_tokens)}
    _final_check(body["model"], options, limits)
    return ParsedRequest(COMPLETION, body["model"], stream, include_usage, options)
