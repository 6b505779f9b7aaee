"""The Responses API's reply shapes: the ``response`` object and its typed stream events (pure: no I/O).

:class:`ResponsesFormat` builds, for one request, either the whole ``response`` object
(``output``: a ``message`` item with ``output_text`` and one ``function_call`` item per tool
call) or its stream of typed server-sent events, as the ``openai`` package reads them
(``openai/types/responses``): ``response.created``, ``response.in_progress``; for text
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` ..., ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``; for each tool call
``response.output_item.added``, ``response.function_call_arguments.delta`` ...,
``response.function_call_arguments.done``, ``response.output_item.done``; then
``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` cut it).
An error after the stream started is an ``error`` event and ``response.failed``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mlx_fleet.client import Completion, StreamChunk
from mlx_fleet.gateway.openai_schema import ParsedRequest
from mlx_fleet.gateway.responses_schema import parse_responses_request

__all__ = ["ResponsesFormat", "parse_responses_request"]


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": int(usage.get("cached_tokens", 0)), "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _tool_echo(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    return {"type": "function", "name": fn["name"], "description": fn.get("description"),
            "parameters": fn.get("parameters"), "strict": fn.get("strict", False)}


class ResponsesFormat:
    """Builds the ``response`` object, or the stream of typed events, of one ``POST /v1/responses``."""

    def __init__(self, body: dict[str, Any], parsed: ParsedRequest, *, response_id: str, created_s: int) -> None:
        self.id = response_id
        self.body = body
        self.parsed = parsed
        self.created_s = created_s
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # output items so far (streaming)
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._call_items: dict[int, dict[str, Any]] = {}  # tool-call index -> its item

    # ---- the response object -------------------------------------------------------------------

    def response(self, status: str, output: list[dict[str, Any]], done: Completion | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``response`` object in ``status`` with ``output``."""
        o, b = self.parsed.options, self.body
        text_format = (b.get("text") or {}).get("format") or {"type": "text"}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created_s, "status": status, "error": error,
                "incomplete_details": incomplete, "instructions": b.get("instructions"),
                "max_output_tokens": b.get("max_output_tokens"), "model": self.parsed.model, "output": output,
                "parallel_tool_calls": o.get("parallel_tool_calls", True), "previous_response_id": None,
                "reasoning": None, "store": False, "temperature": o.get("temperature"), "text": {"format": text_format},
                "tool_choice": b.get("tool_choice") or ("auto" if o.get("tools") else "none"),
                "tools": [_tool_echo(t) for t in o.get("tools", [])], "top_p": o.get("top_p"), "truncation": "disabled",
                "usage": _usage(done.usage) if done is not None else None, "user": b.get("user"),
                "metadata": b.get("metadata") or {}, **({"warning": done.warning} if done and done.warning else {})}

    @staticmethod
    def _status(done: Completion) -> str:
        return "incomplete" if done.finish_reason == "length" else "completed"

    def full(self, done: Completion) -> dict[str, Any]:
        """The non-streamed ``response`` object."""
        output: list[dict[str, Any]] = []
        if done.text or not done.tool_calls:
            output.append({"id": "msg_" + uuid.uuid4().hex, "type": "message", "status": self._status(done),
                           "role": "assistant", "content": [_text_part(done.text)]})
        for call in done.tool_calls or []:
            output.append({"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": "completed",
                           "call_id": call.get("id", ""), "name": call.get("name", ""),
                           "arguments": call.get("arguments", "")})
        return self.response(self._status(done), output, done)

    # ---- the stream ---------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: ".encode() + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() \
            + b"\n\n"

    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress``."""
        r = self.response("in_progress", [])
        return self._event("response.created", response=r) + self._event("response.in_progress", response=r)

    def chunk(self, c: StreamChunk) -> bytes:
        """The events of one fleet chunk: text deltas and tool-call deltas."""
        out = b""
        if c.text:
            if self._open is None or self._open["type"] != "message":
                out += self._close_open()
                out += self._open_message()
            item = self._open
            assert item is not None
            item["content"][0]["text"] += c.text
            out += self._event("response.output_text.delta", item_id=item["id"], output_index=len(self._items) - 1,
                               content_index=0, delta=c.text, logprobs=[])
        for d in c.tool_calls or []:
            out += self._call_delta(d)
        return out

    def _open_message(self) -> bytes:
        item = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "status": "in_progress", "role": "assistant",
                "content": [_text_part("")]}
        self._items.append(item)
        self._open = item
        i = len(self._items) - 1
        return self._event("response.output_item.added", output_index=i, item={**item, "content": []}) + \
            self._event("response.content_part.added", item_id=item["id"], output_index=i, content_index=0,
                        part=_text_part(""))

    def _call_delta(self, d: dict[str, Any]) -> bytes:
        out = b""
        index = int(d.get("index", 0))
        item = self._call_items.get(index)
        if item is None:
            out += self._close_open()
            item = {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": "in_progress",
                    "call_id": d.get("id") or "", "name": d.get("name") or "", "arguments": ""}
            self._items.append(item)
            self._call_items[index] = item
            self._open = item
            out += self._event("response.output_item.added", output_index=len(self._items) - 1, item=dict(item))
        frag = d.get("arguments") or ""
        if frag:
            item["arguments"] += frag
            out += self._event("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=self._items.index(item), delta=frag)
        return out

    def _close_open(self, status: str = "completed") -> bytes:
        item, self._open = self._open, None
        if item is None:
            return b""
        i = self._items.index(item)
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            return self._event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                               text=part["text"], logprobs=[]) + \
                self._event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                            part=part) + \
                self._event("response.output_item.done", output_index=i, item=item)
        return self._event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                           arguments=item["arguments"], name=item["name"]) + \
            self._event("response.output_item.done", output_index=i, item=item)

    def finish(self, done: Completion) -> bytes:
        """Close the open item; ``response.completed`` (or ``response.incomplete``) with the whole response."""
        status = self._status(done)
        out = self._close_open("incomplete" if status == "incomplete" else "completed")
        if not self._items:  # an empty answer is still a message
            out += self._open_message() + self._close_open()
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._event(kind, response=self.response(status, self._items, done))

    def error(self, body: dict[str, Any]) -> bytes:
        """An ``error`` event, then ``response.failed``."""
        err = body.get("error", {})
        out = self._event("error", code=err.get("code"), message=err.get("message", ""), param=err.get("param"))
        failed = self.response("failed", self._items, error={"code": err.get("code") or "server_error",
                                                              "message": err.get("message", "")})
        return out + self._event("response.failed", response=failed)
