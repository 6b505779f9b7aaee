"""Every limit in docs/protocol.md's Limits table: refused with `bad_request` that names the request.

The error must carry the request's id (so a client with many requests in flight
knows which one failed) and its message must say what was too large. The frame
size limit, which drops the connection instead, is in test_transport.py.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from tests.conformance.conftest import Target
from tests.integration.clients import TAG, RawClient, generate, pack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_TOKENS = 131_072
MAX_MESSAGES = 1024
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOKENS_LIMIT = 32_768
MAX_ID_CHARS = 256
MAX_MAP_KEYS = 512
MAX_ARRAY_ITEMS = 131_072


def turn(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, **extra}


# (id, fields of the generate, words the message must hold); every row over one limit
OVER: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("prompt-chars", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, ("max_prompt_chars", str(MAX_PROMPT_CHARS + 1))),
    ("messages-chars", {"prompt": None, "messages": [turn("x" * (MAX_PROMPT_CHARS // 2 + 1))] * 2},
     ("max_prompt_chars",)),
    ("prompt-tokens", {"prompt": None, "prompt_tokens": [1] * (MAX_PROMPT_TOKENS + 1)},
     ("prompt_tokens", "max_prompt_tokens", str(MAX_PROMPT_TOKENS + 1))),
    ("prompt-tokens-far-over", {"prompt": None, "prompt_tokens": [1] * (3 * MAX_PROMPT_TOKENS)},
     ("max_prompt_tokens", str(3 * MAX_PROMPT_TOKENS))),
    ("messages", {"prompt": None, "messages": [turn()] * (MAX_MESSAGES + 1)}, ("max_messages", str(MAX_MESSAGES + 1))),
    ("messages-far-over", {"prompt": None, "messages": [turn()] * (MAX_ARRAY_ITEMS + 1)}, ("max_messages",)),
    ("stop-strings", {"stop": ["a"] * (MAX_STOP_STRINGS + 1)}, ("max_stop_strings",)),
    ("stop-chars", {"stop": ["a" * (MAX_STOP_CHARS + 1)]}, ("max_stop_chars",)),
    ("max-tokens", {"max_tokens": MAX_TOKENS_LIMIT + 1}, ("max_tokens", str(MAX_TOKENS_LIMIT))),
    ("model-chars", {"model": "m" * (MAX_ID_CHARS + 1)}, ("model", "max_id_chars")),
    ("affinity-chars", {"affinity": "a" * (MAX_ID_CHARS + 1)}, ("affinity", "max_id_chars")),
    ("map-keys", {f"extra{i}": i for i in range(MAX_MAP_KEYS)}, ("max_map_keys",)),
    ("nested-map-keys", {"prompt": None, "messages": [turn(**{f"k{i}": "v" for i in range(MAX_MAP_KEYS)})]},
     ("messages", "max_map_keys")),
    ("other-array", {"stop": ["a"] * (MAX_ARRAY_ITEMS + 1)}, ("stop", "max_stop_strings")),
]


@pytest.mark.parametrize("fields, words", [(f, w) for _, f, w in OVER], ids=[i for i, _, _ in OVER])
def test_over_a_limit_is_refused_naming_the_request(wire: RawClient, target: Target, fields: dict[str, Any],
                                                    words: tuple[str, ...]) -> None:
    request_id = "over-" + "-".join(sorted(fields))[:40]
    fields = dict(fields)
    reply = wire.call(generate(request_id, fields.pop("model", target.model), **fields), timeout_s=60)
    assert reply["type"] == "error" and reply["code"] == "bad_request", reply
    assert reply["request_id"] == request_id
    assert all(w in reply["message"] for w in words), reply["message"]


# At each limit exactly, the request is accepted (cancelled at once: only acceptance matters).
AT: list[tuple[str, dict[str, Any]]] = [
    ("stop-strings", {"stop": ["zq"] * MAX_STOP_STRINGS}),
    ("stop-chars", {"stop": ["z" * MAX_STOP_CHARS]}),
    ("max-tokens", {"max_tokens": MAX_TOKENS_LIMIT}),
    ("affinity-chars", {"affinity": "a" * MAX_ID_CHARS}),
    ("request-id-chars", {"request_id": "r" * MAX_ID_CHARS}),
    ("messages", {"prompt": None, "messages": [turn("a")] * 8}),
]


@pytest.mark.parametrize("fields", [f for _, f in AT], ids=[i for i, _ in AT])
def test_at_a_limit_is_accepted(wire: RawClient, target: Target, fields: dict[str, Any]) -> None:
    fields = dict(fields)
    request_id = fields.pop("request_id", "at-" + "-".join(sorted(fields)))
    wire.send(generate(request_id, target.model, **fields))
    wire.send({"type": "cancel", "request_id": request_id})
    end = wire.finish(request_id, timeout_s=60).end
    assert end["type"] == "done", end


def test_a_request_id_over_the_limit_cannot_be_named(wire: RawClient, target: Target) -> None:
    wire.send(generate("r" * (MAX_ID_CHARS + 1), target.model))
    reply = wire.recv(30)
    assert reply is not None and reply["type"] == "error" and reply["code"] == "bad_request"
    assert "request_id" not in reply and "request_id" in reply["message"] and "max_id_chars" in reply["message"]


# Payloads the decoder cannot take as they are, yet whose request_id is readable.
def _invalid_utf8_prompt(model: str) -> bytes:
    good = pack(generate("utf8", model, prompt="@@"))
    return good.replace(b"\xa2@@", b"\xa2\xff\xfe")


def _int_key_in_a_turn(model: str) -> bytes:
    return pack(generate("intkey", model, prompt=None, messages=[{1: "user", "content": "hi"}]))


def _trailing_bytes(model: str) -> bytes:
    return pack(generate("trailing", model)) + b"\x00"


UNDECODABLE: list[tuple[str, Callable[[str], bytes], str, str]] = [
    ("invalid-utf8", _invalid_utf8_prompt, "utf8", "UTF-8"),
    ("int-map-key", _int_key_in_a_turn, "intkey", "non-string key"),
    ("trailing-bytes", _trailing_bytes, "trailing", "msgpack"),
]


@pytest.mark.parametrize("make, request_id, word", [(m, r, w) for _, m, r, w in UNDECODABLE],
                         ids=[i for i, _, _, _ in UNDECODABLE])
def test_an_undecodable_field_is_refused_naming_the_request(wire: RawClient, target: Target, make: Any,
                                                            request_id: str, word: str) -> None:
    wire.send_frames([TAG, make(target.model)])
    reply = wire.reply_to(request_id)
    assert reply["type"] == "error" and reply["code"] == "bad_request" and word in reply["message"], reply


def test_others_in_flight_are_unaffected_by_a_refusal(wire: RawClient, target: Target) -> None:
    """The point of naming the request: a client with several in flight knows which one failed."""
    wire.send(generate("good", target.model, max_tokens=4))
    wire.send(generate("bad", target.model, prompt=None, prompt_tokens=[1] * (MAX_PROMPT_TOKENS + 1)))
    assert wire.finish("bad").end["code"] == "bad_request"
    assert wire.finish("good").end["type"] == "done"
