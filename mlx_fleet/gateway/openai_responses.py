"""OpenAI response bodies and server-sent events for chat and completions (pure: no I/O).

One :class:`ResponseFormat` per request builds either the whole response
(``chat.completion`` / ``text_completion``) or its stream of SSE events: an opening
event per choice (chat: the assistant role), one event per fleet chunk (text,
``logprobs``, ``tool_calls`` deltas), a closing event per choice with its
``finish_reason``, the usage event when asked for, and ``data: [DONE]``.

Logprobs: chat's ``choices[].logprobs.content[]`` (``token``, ``logprob``, ``bytes``,
``top_logprobs``), and the legacy completions shape (``tokens``, ``token_logprobs``,
``top_logprobs`` as token -> logprob maps, ``text_offset``). Tool calls: ``message.tool_calls``
(``id``, ``type: function``, ``function.name``, ``function.arguments`` as JSON text),
streamed as ``delta.tool_calls`` (id, type and name first, then argument fragments).
A response whose output held a tool call that did not parse carries ``warning``
(docs/http.md); that call's text is in the content.
"""

from __future__ import annotations

import json
from typing import Any

from mlx_fleet.client import Completion, StreamChunk
from mlx_fleet.gateway.openai_schema import CHAT

SSE_DONE = b"data: [DONE]\n\n"
# The fleet's finish reasons that OpenAI clients know; `cancelled` is answered as an error.
FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


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


def chat_logprob(entry: dict[str, Any]) -> dict[str, Any]:
    """One token's logprob in chat's shape (the fleet's entry without its token ids)."""
    return {"token": entry.get("token", ""), "logprob": entry.get("logprob", 0.0), "bytes": entry.get("bytes"),
            "top_logprobs": [{"token": t.get("token", ""), "logprob": t.get("logprob", 0.0), "bytes": t.get("bytes")}
                             for t in entry.get("top_logprobs") or []]}


def legacy_logprobs(entries: list[dict[str, Any]], text_at: int, top: bool) -> dict[str, Any]:
    """The completions API's logprobs object for ``entries``, whose text starts at character ``text_at``."""
    offsets = []
    for e in entries:
        offsets.append(text_at)
        text_at += len(e.get("token", ""))
    return {"tokens": [e.get("token", "") for e in entries], "token_logprobs": [e.get("logprob") for e in entries],
            "top_logprobs": [{t.get("token", ""): t.get("logprob") for t in e.get("top_logprobs") or []}
                             for e in entries] if top else None,
            "text_offset": offsets}


def tool_call_body(call: dict[str, Any]) -> dict[str, Any]:
    """A complete call (``{"id", "name", "arguments"}``) as OpenAI's ``tool_calls`` entry."""
    return {"id": call.get("id", ""), "type": "function",
            "function": {"name": call.get("name", ""), "arguments": call.get("arguments", "")}}


def tool_call_delta(delta: dict[str, Any]) -> dict[str, Any]:
    """A fleet tool-call delta as OpenAI's ``delta.tool_calls`` entry: id, type and name on its first."""
    out: dict[str, Any] = {"index": int(delta.get("index", 0))}
    fn: dict[str, Any] = {}
    if delta.get("id") is not None:
        out["id"] = delta["id"]
        out["type"] = "function"
    if delta.get("name") is not None:
        fn["name"] = delta["name"]
    fn["arguments"] = delta.get("arguments", "")
    out["function"] = fn
    return out


def choices_of(done: Completion) -> list[tuple[int, str, list[dict[str, Any]] | None, list[dict[str, Any]] | None, str]]:
    """Each completion of ``done``: (index, text, logprobs, tool calls, finish_reason)."""
    if done.choices:
        return [(c.index, c.text, c.logprobs, c.tool_calls, c.finish_reason) for c in done.choices]
    return [(0, done.text, done.logprobs, done.tool_calls, done.finish_reason)]


class ResponseFormat:
    """Builds the bodies of one chat or completions response.

    ``top_logprobs``: whether the request asked for alternatives (the legacy shape has
    ``top_logprobs: null`` otherwise).
    """

    def __init__(self, kind: str, *, completion_id: str, model: str, created_s: int, include_usage: bool = False,
                 n: int = 1, top_logprobs: bool = False) -> None:
        self.chat = kind == CHAT
        self.id = completion_id
        self.model = model
        self.created_s = created_s
        self.include_usage = include_usage
        self.n = n
        self.top = top_logprobs
        self._chars: dict[int, int] = {}  # streamed text per choice, for the legacy text_offset

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created_s, "model": self.model}

    def full(self, done: Completion) -> dict[str, Any]:
        """The non-streamed response body."""
        body = self._head("chat.completion" if self.chat else "text_completion")
        choices = []
        for index, text, logprobs, calls, reason in choices_of(done):
            finish = FINISH_REASONS.get(reason, reason)
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if calls:
                    message["tool_calls"] = [tool_call_body(c) for c in calls]
                    message["content"] = text or None
                lp = {"content": [chat_logprob(e) for e in logprobs]} if logprobs is not None else None
                choices.append({"index": index, "message": message, "logprobs": lp, "finish_reason": finish})
            else:
                lp = legacy_logprobs(logprobs, 0, self.top) if logprobs is not None else None
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": finish})
        body["choices"] = choices
        body["usage"] = usage_body(done.usage)
        if done.warning:
            body["warning"] = done.warning
        return body

    def _event(self, index: int, delta: dict[str, Any], text: str, logprobs: Any, finish_reason: str | None) -> bytes:
        if self.chat:
            body = self._head("chat.completion.chunk")
            body["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        else:
            body = self._head("text_completion")
            body["choices"] = [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
        if self.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        return sse_event(body)

    def start(self) -> bytes:
        """The opening events: chat announces the assistant role for each choice; completions send nothing."""
        if not self.chat:
            return b""
        return b"".join(self._event(i, {"role": "assistant", "content": ""}, "", None, None) for i in range(self.n))

    def chunk(self, c: StreamChunk) -> bytes:
        """The event of one fleet chunk (b"" when it carries nothing to show)."""
        if not c.text and not c.tool_calls and not c.logprobs:
            return b""
        if self.chat:
            delta: dict[str, Any] = {}
            if c.text or not c.tool_calls:
                delta["content"] = c.text
            if c.tool_calls:
                delta["tool_calls"] = [tool_call_delta(d) for d in c.tool_calls]
            lp = {"content": [chat_logprob(e) for e in c.logprobs]} if c.logprobs else None
            return self._event(c.index, delta, "", lp, None)
        at = self._chars.get(c.index, 0)
        self._chars[c.index] = at + len(c.text)
        lp = legacy_logprobs(c.logprobs, at, self.top) if c.logprobs else None
        return self._event(c.index, {}, c.text, lp, None)

    def delta(self, text: str) -> bytes:
        """One event carrying new text of the first choice."""
        return self.chunk(StreamChunk(text, []))

    def finish(self, done: Completion) -> bytes:
        """The closing events: each choice's finish_reason, the usage when asked for, then ``[DONE]``."""
        out = b""
        for index, _, _, _, reason in choices_of(done):
            out += self._event(index, {}, "", None, FINISH_REASONS.get(reason, reason))
        if self.include_usage or done.warning:
            body = self._head("chat.completion.chunk" if self.chat else "text_completion")
            body["choices"] = []
            body["usage"] = usage_body(done.usage) if self.include_usage else None
            if done.warning:
                body["warning"] = done.warning
            out += sse_event(body)
        return out + SSE_DONE

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        """An in-band error once the stream has started (its status is already 200), then ``[DONE]``."""
        return sse_event(body) + SSE_DONE
