"""One request's tool calling, as the worker's session drives it (pure: no MLX).

:class:`RequestTools` is what a request's ``tools`` mean while it runs: checked against
the model at dispatch (:func:`workers.tools.plan_tools`), the tools its chat template
renders, the grammar and stop strings decoding needs, and for each of its completions a
:class:`workers.tool_calls.ToolCallStream` that turns the generated text into content and
tool-call deltas. At the end it gives the complete calls, the ``finish_reason``
(``tool_calls`` when the model stopped after calling) and any warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.protocol import Generate
from workers.tool_calls import ToolCallStream, ToolOutput
from workers.tools import ToolPlan, ToolSupport, plan_tools


@dataclass
class Ending:
    """How one completion ended, once its calls are read."""

    content: str  # the last content (text held back until the end)
    deltas: list[dict[str, Any]]  # the last tool-call deltas
    finish_reason: str
    calls: list[dict[str, Any]] | None
    warning: str | None


@dataclass
class RequestTools:
    """A request's tool plan and, when it reads calls, one call stream per completion index."""

    plan: ToolPlan
    streams: dict[int, ToolCallStream] = field(default_factory=dict)

    @classmethod
    def for_request(cls, req: Generate, support: ToolSupport) -> "RequestTools":
        """The plan for ``req``; raises :class:`workers.tools.ToolRequestError` for what the model cannot honour."""
        return cls(plan_tools(support, req.tools, req.tool_choice, req.parallel_tool_calls, req.grammar))

    @property
    def reads_calls(self) -> bool:
        """Whether the output is read for tool calls."""
        return self.plan.parse is not None

    def grammar(self, requested: dict[str, Any] | None) -> dict[str, Any] | None:
        """The grammar decoding follows: the tool grammar when there is one, else the request's own."""
        return self.plan.grammar if self.plan.grammar is not None else requested

    def stop(self, requested: list[str] | None) -> list[str]:
        """The request's stop strings and the ones the plan adds."""
        return [*(requested or []), *(s for s in self.plan.stop if s not in (requested or []))]

    def _stream(self, index: int) -> ToolCallStream:
        assert self.plan.parse is not None
        s = self.streams.get(index)
        if s is None:
            s = self.streams[index] = ToolCallStream(self.plan.parse, self.plan.template_tools)
        return s

    def output(self, text: str, index: int = 0) -> ToolOutput:
        """New text of completion ``index``: its content and tool-call deltas."""
        if not self.reads_calls:
            return ToolOutput(text)
        return self._stream(index).feed(text)

    def calls(self, index: int = 0) -> list[dict[str, Any]] | None:
        """The complete calls of completion ``index`` (None: none, or calls are not read)."""
        s = self.streams.get(index)
        return (s.calls or None) if s is not None else None

    @property
    def warning(self) -> str | None:
        """Why output that looked like a call came back as content, over every completion; None when none did."""
        notes = [f"completion {i}: {s.warning}" if len(self.streams) > 1 else s.warning
                 for i, s in sorted(self.streams.items()) if s.warning]
        return "; ".join(n for n in notes if n) or None

    def end(self, text: str, finish_reason: str, index: int = 0) -> Ending:
        """The last text of completion ``index`` and how it ended."""
        if not self.reads_calls:
            return Ending(text, [], finish_reason, None, None)
        s = self._stream(index)
        head, tail = s.feed(text), s.finish()
        calls = s.calls or None
        reason = "tool_calls" if calls and finish_reason == "stop" else finish_reason
        return Ending(head.content + tail.content, head.deltas + tail.deltas, reason, calls, s.warning)
