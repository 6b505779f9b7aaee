"""OpenAI request parsing for the HTTP gateway: chat and legacy completions (pure: no I/O).

A request body becomes a :class:`ParsedRequest` whose ``options`` are the
fields of a protocol ``generate`` message, or an :class:`OpenAIError` (HTTP 400)
that names the offending parameter. Every parameter of OpenAI's chat and
legacy completions APIs falls in one of four groups:

- supported: translated to the fleet's fields (sampling here; the decoding controls,
  tools and response formats in :mod:`mlx_fleet.gateway.openai_fields`);
- ignored (``IGNORED_FIELDS``): metadata that cannot change the output;
- neutral-only (``CHAT_NEUTRAL`` / ``COMPLETION_NEUTRAL``): accepted only at the
  value that changes nothing (``best_of=1``, ``echo=false``...), else a 400;
- anything else: a 400 ``unknown_parameter``, as OpenAI answers.

``null`` is the same as leaving a field out. ``docs/http.md`` lists the groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from actors.protocol import DEFAULT_LIMITS, PRIORITIES, Generate, Limits, ProtocolError, validate_generate
from mlx_fleet.gateway.errors import FLEET_ERRORS, OpenAIError, bad_param, error_from_fleet
from mlx_fleet.gateway.openai_fields import (
    CHAT_PARAMS, chat_message, controls, integer, is_int, number, param_of, response_format_grammar,
    tool_fields,
)

__all__ = [
    "CHAT", "COMPLETION", "DEFAULT_MAX_TOKENS", "FLEET_ERRORS", "OpenAIError", "ParsedRequest", "bad_param",
    "error_from_fleet", "parse_chat_request", "parse_completion_request",
]

CHAT = "chat"
COMPLETION = "completion"
RESPONSES = "responses"
DEFAULT_MAX_TOKENS = 512  # as mlx_lm.server; OpenAI's own default is "until the context is full"
DEFAULT_TEMPERATURE = 1.0  # OpenAI's documented default
MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]


@dataclass
class ParsedRequest:
    """A validated OpenAI request. ``options`` are ``generate`` fields (model excluded).

    ``params`` maps a generate field to the request parameter it came from, so a refusal
    by the fleet names the parameter the client sent.
    """

    kind: str  # CHAT | COMPLETION | RESPONSES
    model: str
    stream: bool
    include_usage: bool
    options: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=lambda: dict(CHAT_PARAMS))


IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention",
})
# mlx-fleet extensions (send them with the openai package's ``extra_body``).
EXTENSION_FIELDS = frozenset({"top_k", "timeout_s", "priority", "min_p", "repetition_penalty"})
SAMPLING_FIELDS = frozenset({"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed"})
CONTROL_FIELDS = frozenset({"n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"})


Neutral = tuple[Callable[[Any], bool], str]
CHAT_NEUTRAL: dict[str, Neutral] = {
    "functions": (lambda v: v == [], "the functions field is deprecated; send tools"),
    "function_call": (lambda v: v == "none", "the function_call field is deprecated; send tool_choice"),
    "modalities": (lambda v: v == ["text"], "only the text modality is supported"),
    "audio": (lambda v: False, "audio output is not supported"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "web_search_options": (lambda v: False, "web search is not supported"),
    "reasoning_effort": (lambda v: False, "reasoning_effort is not supported"),
    "verbosity": (lambda v: False, "verbosity is not supported"),
}
COMPLETION_NEUTRAL: dict[str, Neutral] = {
    "best_of": (lambda v: is_int(v) and v == 1, "only best_of=1 is supported"),
    "echo": (lambda v: v is False, "echo is not supported"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported"),
}
CHAT_OWN = frozenset({"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                      "parallel_tool_calls", "response_format"})


def check_fields(body: dict[str, Any], own: frozenset[str], neutral: dict[str, Neutral]) -> None:
    """Every field known, and each neutral-only field at its neutral value."""
    for name, value in body.items():
        if value is None or name in own or name in SAMPLING_FIELDS or name in IGNORED_FIELDS \
                or name in EXTENSION_FIELDS or name in CONTROL_FIELDS:
            continue
        rule = neutral.get(name)
        if rule is None:
            raise bad_param(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")
        ok, why = rule
        if not ok(value):
            raise bad_param(name, f"'{name}' is not supported by mlx-fleet: {why}", "unsupported_parameter")


def sampling(body: dict[str, Any], limits: Limits, default_max_tokens: int, *, max_tokens_name: str = "max_tokens",
             newer_name: str | None = None) -> dict[str, Any]:
    """max_tokens, temperature, top_p, stop, seed and the extensions, as generate fields."""
    hi = limits.max_tokens_limit
    max_tokens = integer(body, max_tokens_name, 1, hi)
    if newer_name is not None:
        newer = integer(body, newer_name, 1, hi)
        if newer is not None and max_tokens is not None and newer != max_tokens:
            raise bad_param(newer_name, f"give {newer_name} or {max_tokens_name}, not both with different values")
        max_tokens = newer if newer is not None else max_tokens
    out: dict[str, Any] = {
        "max_tokens": max_tokens if max_tokens is not None else default_max_tokens,
        "temperature": number(body, "temperature", 0.0, MAX_TEMPERATURE, DEFAULT_TEMPERATURE),
        "top_p": number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
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
    seed = integer(body, "seed", 0, 2**63 - 1)
    if seed is not None:
        out["seed"] = seed
    top_k = integer(body, "top_k", 0, 2**31 - 1)
    if top_k is not None:
        out["top_k"] = top_k
    if body.get("timeout_s") is not None:
        out["timeout_s"] = number(body, "timeout_s", 0.0, 86_400.0, 0.0, lo_open=True)
    priority = body.get("priority")
    if priority is not None:
        if priority not in PRIORITIES:
            raise bad_param("priority", f"'priority' must be one of {', '.join(PRIORITIES)}")
        out["priority"] = priority
    return out


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
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


def request_object(body: Any) -> dict[str, Any]:
    """The body as a JSON object with a ``model``."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_param("model", "'model' is required and must be a non-empty string", "missing_required_parameter")
    return body


def final_check(model: str, options: dict[str, Any], limits: Limits, params: dict[str, str]) -> None:
    """The protocol's own bounds, so the broker never refuses what we accepted."""
    try:
        validate_generate(Generate(request_id="check", model=model, **options), limits)
    except ProtocolError as exc:
        raise OpenAIError(400, exc.message.removeprefix("generate: "), param=param_of(exc.message, params),
                          code="invalid_value") from None
    if len(model) > limits.max_id_chars:
        raise bad_param("model", f"'model' longer than {limits.max_id_chars} characters")


def _messages(value: Any, limits: Limits) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad_param("messages", "'messages' is required and must be a non-empty list", "missing_required_parameter")
    if len(value) > limits.max_messages:
        raise bad_param("messages", f"at most {limits.max_messages} messages are accepted")
    return [chat_message(m, i) for i, m in enumerate(value)]


def parse_chat_request(body: Any, *, limits: Limits = DEFAULT_LIMITS,
                       default_max_tokens: int = DEFAULT_MAX_TOKENS) -> ParsedRequest:
    """Validate a ``POST /v1/chat/completions`` body. Raises OpenAIError (400)."""
    body = request_object(body)
    check_fields(body, CHAT_OWN, CHAT_NEUTRAL)
    stream, include_usage = stream_flags(body)
    options = {"messages": _messages(body.get("messages"), limits),
               **sampling(body, limits, default_max_tokens, newer_name="max_completion_tokens"),
               **controls(body), **tool_fields(body)}
    return _parsed(CHAT, body, stream, include_usage, options, limits)


def _parsed(kind: str, body: dict[str, Any], stream: bool, include_usage: bool, options: dict[str, Any],
            limits: Limits) -> ParsedRequest:
    """The request with its ``response_format`` grammar (an mlx-fleet extension on completions), checked."""
    if body.get("response_format") is not None:
        grammar = response_format_grammar(body["response_format"], "response_format")
        if grammar is not None:
            options["grammar"] = grammar
    parsed = ParsedRequest(kind, body["model"], stream, include_usage, options)
    final_check(body["model"], options, limits, parsed.params)
    return parsed


def _prompt(value: Any, limits: Limits) -> dict[str, Any]:
    """A completions prompt: a string, or token ids; a one-element list of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return {"prompt": value}
    if isinstance(value, list) and value and all(is_int(t) for t in value):
        if any(not 0 <= t < 2**31 for t in value):
            raise bad_param("prompt", "token ids in 'prompt' must be non-negative")
        return {"prompt_tokens": list(value)}
    if isinstance(value, list) and len(value) > 1:
        raise bad_param("prompt", "only one prompt per request is supported (send one request per prompt, or use n)",
                        "unsupported_parameter")
    raise bad_param("prompt", "'prompt' must be a string, a list of token ids, or a one-element list of either",
                    "missing_required_parameter" if value is None else "invalid_value")


def parse_completion_request(body: Any, *, limits: Limits = DEFAULT_LIMITS,
                             default_max_tokens: int = DEFAULT_MAX_TOKENS) -> ParsedRequest:
    """Validate a ``POST /v1/completions`` body. Raises OpenAIError (400)."""
    body = request_object(body)
    check_fields(body, frozenset({"prompt", "response_format"}), COMPLETION_NEUTRAL)
    stream, include_usage = stream_flags(body)
    options = {**_prompt(body.get("prompt"), limits), **sampling(body, limits, default_max_tokens),
               **controls(body, legacy_logprobs=True)}
    return _parsed(COMPLETION, body, stream, include_usage, options, limits)
