"""Reading tool calls out of a completion's text as it is generated (pure: no MLX).

:class:`ToolCallStream` splits one completion's text: what lies outside calls is content;
each call, between its format's markers (:class:`workers.tools.ToolFormat`), becomes
tool-call deltas in the contract's shape (``chunk.tool_calls``): its id and name first, then
its arguments in fragments as they are generated, for ``json_tools`` whose arguments are JSON
after the name; other formats send the arguments whole once the call is closed, as parsed
by mlx-lm's parser for the format. Whitespace right before or between calls is not content.
A call that does not parse comes back as content with a :attr:`ToolCallStream.warning`,
never dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from workers.tools import JSON_TOOLS, ToolFormat

_JSON_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')



@dataclass
class ToolOutput:
    """What a piece of output is: content text and tool-call deltas (contract: chunk ``tool_calls``)."""

    content: str = ""
    deltas: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Call:
    index: int
    text: str = ""  # the call's text so far, markers excluded
    id: str = ""
    name: str | None = None  # announced (its first delta sent)
    args_at: int = -1  # where the arguments start in ``text``; -1: not found (yet)
    args_sent: int = 0  # characters of arguments sent as fragments
    args_done: bool = False  # the arguments' JSON value is complete
    depth: int = 0
    in_string: bool = False
    escaped: bool = False


def new_call_id() -> str:
    """A fresh tool-call id, as OpenAI's ``call_...``."""
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallStream:
    """One completion's output, split into content and tool calls as it is generated."""

    def __init__(self, fmt: ToolFormat, tools: list[dict[str, Any]] | None = None) -> None:
        self.fmt = fmt
        self.tools = tools
        self.calls: list[dict[str, Any]] = []  # complete: {"id", "name", "arguments"}
        self.warnings: list[str] = []
        self._buf = ""  # text not yet decided (a possible call start, or whitespace)
        self._call: _Call | None = None
        self._made = 0  # calls opened so far (their indexes)
        self._held_space = ""

    def feed(self, text: str) -> ToolOutput:
        """New output text: what of it is content now, and the tool-call deltas it completes."""
        out = ToolOutput()
        self._buf += text
        while self._buf:
            if self._call is None:
                if not self._scan_content(out):
                    break
            elif not self._scan_call(out):
                break
        return out

    def finish(self) -> ToolOutput:
        """The output has ended: what is left; a call still open is read as it stands (or returned as content)."""
        out = ToolOutput()
        if self._call is not None:
            self._call.text += self._buf
            self._buf = ""
            self._stream_args(self._call, out)
            self._close(out, marker=False)
        else:
            self._flush_content(out, self._buf)
            self._buf = ""
        if not self.calls:
            out.content += self._held_space  # trailing whitespace of a plain answer is the model's
        self._held_space = ""
        return out

    @property
    def warning(self) -> str | None:
        """Why some output that looked like a call came back as content; None when nothing did."""
        return "; ".join(self.warnings) or None

    # ---- content ------------------------------------------------------------------------------

    def _scan_content(self, out: ToolOutput) -> bool:
        start = self.fmt.call_start
        at = self._buf.find(start)
        if at >= 0:
            self._flush_content(out, self._buf[:at])
            self._held_space = ""  # whitespace right before a call is not content
            self._buf = self._buf[at + len(start):]
            self._call = _Call(self._made)
            self._made += 1
            return True
        keep = _prefix_overlap(self._buf, start)
        self._flush_content(out, self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _flush_content(self, out: ToolOutput, text: str) -> None:
        """Content, its trailing whitespace held back (before or between calls it is not content)."""
        text = self._held_space + text
        stripped = text.rstrip()
        self._held_space = text[len(stripped):]
        out.content += stripped

    # ---- calls ---------------------------------------------------------------------------------

    def _scan_call(self, out: ToolOutput) -> bool:
        call = self._call
        assert call is not None
        end = self.fmt.call_end
        at = self._buf.find(end) if end else -1
        if at >= 0:
            call.text += self._buf[:at]
            self._buf = self._buf[at + len(end):]
            self._stream_args(call, out)
            self._close(out, marker=True)
            return True
        keep = _prefix_overlap(self._buf, end) if end else 0
        call.text += self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep:]
        self._stream_args(call, out)
        return False

    def _stream_args(self, call: _Call, out: ToolOutput) -> None:
        """json_tools: announce the call once its name is read, then send its arguments as they come."""
        if self.fmt.name != JSON_TOOLS:
            return
        if call.name is None:
            m = _JSON_HEAD.match(call.text)
            if m is None or len(call.text) == m.end() or call.text[m.end()] != "{":
                return  # not yet (or arguments that are not an object: sent whole at the close)
            call.name, call.id, call.args_at = json.loads(m.group(1)), new_call_id(), m.end()
            out.deltas.append({"index": call.index, "id": call.id, "name": call.name, "arguments": ""})
        if call.args_done:
            return
        start = call.args_at + call.args_sent
        end = _scan_json(call, call.text, start)
        if end > start:
            out.deltas.append({"index": call.index, "arguments": call.text[start:end]})
            call.args_sent += end - start

    def _close(self, out: ToolOutput, *, marker: bool) -> None:
        """The call is over (``marker``: its end marker was read; else the output ended): its calls, or content."""
        call = self._call
        assert call is not None
        self._call = None
        parsed = _parse_calls(self.fmt, call.text, self.tools)
        streamed = call.text[call.args_at: call.args_at + call.args_sent] if call.name is not None else ""
        if call.name is not None and parsed is not None and not _same_call(parsed, call.name, streamed, call.args_done):
            parsed = None
        if parsed is None:
            raw = self.fmt.call_start + call.text + (self.fmt.call_end if marker else "")
            why = "did not parse" if marker or not self.fmt.call_end else "was cut off before it closed"
            streamed_note = " (the deltas already streamed for it are incomplete)" if call.name is not None else ""
            self.warnings.append(f"tool call {call.index} {why}; its text is returned as content{streamed_note}")
            out.content += self._held_space + raw
            self._held_space = ""
            return
        if call.name is not None:
            self.calls.append({"id": call.id, "name": call.name, "arguments": streamed})
            return
        for i, c in enumerate(parsed):
            index = call.index
            if i:  # one block with several calls (formats without an end marker)
                index, self._made = self._made, self._made + 1
            cid = c.get("id") or new_call_id()
            self.calls.append({"id": cid, "name": c["name"], "arguments": c["arguments"]})
            out.deltas.append({"index": index, "id": cid, "name": c["name"], "arguments": ""})
            out.deltas.append({"index": index, "arguments": c["arguments"]})


def _same_call(parsed: list[dict[str, Any]], name: str, streamed_args: str, complete: bool) -> bool:
    """Whether what was streamed of a call is the whole call the parser read."""
    return complete and len(parsed) == 1 and parsed[0]["name"] == name \
        and _loads(streamed_args) == _loads(parsed[0]["arguments"])


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _Unparsed()


class _Unparsed:
    """Equal to nothing: an argument text that is not JSON never matches."""

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return 0


def _parse_calls(fmt: ToolFormat, text: str, tools: Any) -> list[dict[str, Any]] | None:
    """mlx-lm's parser over one call's text, normalised to [{"name", "arguments" (JSON text), "id"?}]; None: no call."""
    try:
        parsed = fmt.parse(text, tools)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None
    out = []
    for c in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            return None
        args = c.get("arguments", {})
        if isinstance(args, str):
            args = _loads(args)
        if not isinstance(args, dict):
            return None
        call = {"name": c["name"], "arguments": json.dumps(args, ensure_ascii=False)}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out or None


def _scan_json(call: _Call, text: str, start: int) -> int:
    """Advance the JSON scanner of ``call`` over ``text[start:]``; where the arguments may be sent up to.

    The arguments are sent as far as the scanner has read, up to the end of their JSON value.
    """
    i = start
    while i < len(text) and not call.args_done:
        ch = text[i]
        if call.in_string:
            if call.escaped:
                call.escaped = False
            elif ch == "\\":
                call.escaped = True
            elif ch == '"':
                call.in_string = False
        elif ch == '"':
            call.in_string = True
        elif ch in "{[":
            call.depth += 1
        elif ch in "}]":
            call.depth -= 1
            if call.depth == 0:
                call.args_done = True
        i += 1
    return i


def _prefix_overlap(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that starts ``marker`` (held back: it may become the marker)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
