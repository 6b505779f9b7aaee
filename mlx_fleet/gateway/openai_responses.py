"""OpenAI response bodies and server-sent events for the HTTP gateway (pure: no I/O).

One :class:`ResponseFormat` per request builds either the whole response
(``chat.completion`` / ``text_completion``) or its stream of SSE events:
an opening event (chat: the assistant role), one event per fleet chunk, a
closing event with ``finish_reason``, the usage event when asked for, and
``data: [DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from mlx_fleet.gateway.openai_schema import CHAT

SSE_DONE = b"data: [DONE]\n\n"
# The fleet's finish reasons that OpenAI clients know; `cancelled` is answered as an error.
FINISH_REASONS = {"stop": "stop", "length": "length"}


def sse_event(obj: dict[str, Any]) -> bytes:
    """One ``data: {json}`` server-sent event."""
    return b"data: " + json_bytes(obj) + b"\n\n"


def json_bytes(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def usage_body(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage object from the fleet's ``done.usage``."""
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(usage.get("cached_tokens", 0))},
    }


class ResponseFormat:
    """Builds the bodies of one chat or completions response."""

    def __init__(self, kind: str, *, completion_id: str, model: str, created_s: int, include_usage: bool = False) -> None:
        self.chat = kind == CHAT
        self.id = completion_id
        self.model = model
        self.created_s = created_s
        self.include_usage = include_usage

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created_s, "model": self.model}

    def full(self, text: str, finish_reason: str, usage: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed response body."""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        body["usage"] = usage_body(usage)
        return body

    def _chunk(self, delta: dict[str, Any] | None, text: str, finish_reason: str | None) -> bytes:
        if self.chat:
            body = self._head("chat.completion.chunk")
            body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            body = self._head("text_completion")
            body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        if self.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        return sse_event(body)

    def start(self) -> bytes:
        """The opening event: chat announces the assistant role; completions send nothing."""
        return self._chunk({"role": "assistant", "content": ""}, "", None) if self.chat else b""

    def delta(self, text: str) -> bytes:
        """One event carrying new text."""
        return self._chunk({"content": text}, text, None)

    def finish(self, finish_reason: str, usage: dict[str, Any]) -> bytes:
        """The closing events: finish_reason, the usage when asked for, then ``[DONE]``."""
        out = self._chunk({}, "", finish_reason)
        if self.include_usage:
            body = self._head("chat.completion.chunk" if self.chat else "text_completion")
            body["choices"] = []
            body["usage"] = usage_body(usage)
            out += sse_event(body)
        return out + SSE_DONE

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        """An in-band error once the stream has started (its status is already 200), then ``[DONE]``."""
        return sse_event(body) + SSE_DONE
