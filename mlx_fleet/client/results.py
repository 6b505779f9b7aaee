"""What a ``generate`` gives back to the user of a client: chunks, choices, the completion.

A request may ask for ``n`` completions of one prompt; each streams under its own
``index``, with its own offsets (docs/protocol.md). :class:`Output` gathers one
completion's streamed output, and :func:`make_completion` builds the user's
:class:`Completion` from the terminal ``done`` and what was streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.protocol import Done


@dataclass
class StreamChunk:
    """New text (and its token ids) of a streaming request.

    ``index`` says which of the request's ``n`` completions it belongs to; ``logprobs``
    has one entry per token id when the request asked for them; ``tool_calls`` holds
    tool-call deltas.
    """

    text: str
    token_ids: list[int]
    index: int = 0
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class Choice:
    """One of the ``n`` completions of a request that asked for more than one."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class Completion:
    """A finished request: its first (or only) completion, and with n > 1 every one in ``choices``."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[dict[str, Any]] | None = None
    choices: list[Choice] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    warning: str | None = None


@dataclass
class Output:
    """One completion's output as streamed so far."""

    parts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    chars: int = 0  # characters of text so far
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shown(self) -> bool:
        """Whether any output came."""
        return bool(self.parts or self.ids)

    def add(self, text: str, ids: list[int], logprobs: list[dict[str, Any]] | None,
            tool_calls: list[dict[str, Any]] | None) -> None:
        """Append a chunk's new part."""
        self.parts.append(text)
        self.chars += len(text)
        self.ids.extend(ids)
        self.logprobs.extend(logprobs or [])
        self.tool_calls.extend(tool_calls or [])


def make_completion(request_id: str, msg: Done, outputs: dict[int, Output]) -> Completion:
    """The completion a ``done`` ends, filled in from the streamed ``outputs`` where the done has no text."""
    first = outputs.get(0) or Output()
    text = "".join(first.parts) if msg.text is None else msg.text
    ids = list(first.ids) if msg.token_ids is None else list(msg.token_ids)
    logprobs = msg.logprobs if msg.logprobs is not None else (list(first.logprobs) or None)
    choices = None
    if msg.choices is not None:
        choices = [_choice(c, outputs.get(int(c.get("index", 0))) or Output()) for c in msg.choices]
        choices.sort(key=lambda c: c.index)
        if msg.text is None and choices:
            text, ids, logprobs = choices[0].text, choices[0].token_ids, choices[0].logprobs
    return Completion(request_id, text, ids, msg.finish_reason, dict(msg.usage), dict(msg.timings), logprobs,
                      choices, msg.tool_calls, msg.warning)


def _choice(entry: dict[str, Any], out: Output) -> Choice:
    text = entry.get("text")
    ids = entry.get("token_ids")
    logprobs = entry.get("logprobs")
    return Choice(int(entry.get("index", 0)), "".join(out.parts) if text is None else str(text),
                  list(out.ids) if ids is None else list(ids), str(entry.get("finish_reason", "")),
                  int(entry.get("completion_tokens", 0)),
                  logprobs if logprobs is not None else (list(out.logprobs) or None), entry.get("tool_calls"))
