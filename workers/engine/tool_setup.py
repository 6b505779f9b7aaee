"""A model's chat template and tool-call format, set up once when the worker loads it.

A ``[[models]]`` entry may name its own chat template (``chat_template``: a Jinja file, or
``smollm2-tools``, the template shipped in ``workers/models/data``) and its tool-call format
(``tool_format``: one of mlx-lm's tool parsers, ``mlx_lm/tool_parsers/<name>.py``, or
``none``). Without a ``tool_format`` the format is the tokenizer's own, as mlx-lm chooses it
(``tool_parser_type`` in the tokenizer config, or inferred from the template). The
built-in ``smollm2`` model, whose template knows no tools, gets ``smollm2-tools`` and
``json_tools`` unless its entry says otherwise.

A model can call tools when it has a format and its chat template renders the tools it is
given (checked once here by rendering a probe with and without a tool); otherwise
:class:`workers.tools.ToolSupport` says why, and ``tools`` are refused with that reason.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from workers.tools import ToolFormat, ToolSupport

log = logging.getLogger("mlx_fleet.worker")

DATA = Path(__file__).resolve().parents[1] / "models" / "data"
SHIPPED_TEMPLATES = {"smollm2-tools": DATA / "smollm2_tools.jinja"}
NO_TOOLS = "none"
_PROBE_TOOL = [{"type": "function", "function": {"name": "probe_tool", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}]
_PROBE_MESSAGES = [{"role": "user", "content": "probe"}]


def template_text(value: str) -> str:
    """The Jinja text a ``chat_template`` setting names: a shipped template's name, or a file."""
    path = SHIPPED_TEMPLATES.get(value) or Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"chat_template {value!r}: cannot read {path}: {exc.strerror or exc}; give a Jinja file "
                         f"or one of {', '.join(SHIPPED_TEMPLATES)}") from None


def tool_format(name: str) -> ToolFormat:
    """mlx-lm's tool parser ``name`` as a :class:`ToolFormat`; ValueError for an unknown name."""
    if not name.isidentifier():
        raise ValueError(f"tool_format {name!r} is not a tool parser name")
    try:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    except ImportError:
        raise ValueError(f"tool_format {name!r}: mlx-lm has no such tool parser (mlx_lm/tool_parsers/)") from None
    return ToolFormat(name, module.tool_call_start, module.tool_call_end, module.parse_tool_call)


def _renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders the tools it is given (a prompt with a tool differs from one without)."""
    try:
        plain = tokenizer.apply_chat_template(_PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
        with_tool = tokenizer.apply_chat_template(_PROBE_MESSAGES, tools=_PROBE_TOOL, tokenize=False,
                                                  add_generation_prompt=True)
    except Exception as exc:  # a template that fails on tools cannot take them
        log.info("the chat template fails with tools: %s", exc)
        return False
    return bool(plain != with_tool)


def defaults_for(source: str, chat_template: str, fmt: str) -> tuple[str, str]:
    """The settings a model runs with: its own, or for the built-in ``smollm2`` the shipped tool template."""
    if source in ("smollm2", "builtin:smollm2") and not chat_template and not fmt:
        return "smollm2-tools", "json_tools"
    return chat_template, fmt


class ToolSettings(Protocol):
    """What setting up a model's tools needs of a worker's settings (read-only: they are frozen)."""

    @property
    def model(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def chat_template(self) -> str: ...
    @property
    def tool_format(self) -> str: ...


def model_tools(tokenizer: Any, s: ToolSettings) -> ToolSupport:
    """:func:`setup_tools` with a worker's settings (and the built-in model's defaults)."""
    chat_template, fmt = defaults_for(s.source, s.chat_template, s.tool_format)
    return setup_tools(tokenizer, model=s.model, chat_template=chat_template, fmt=fmt)


def setup_tools(tokenizer: Any, *, model: str, chat_template: str = "", fmt: str = "") -> ToolSupport:
    """Install ``chat_template`` on the tokenizer (when set) and say how the model calls tools."""
    if chat_template:
        tokenizer.chat_template = template_text(chat_template)  # the Hugging Face tokenizer's template
        tokenizer._chat_template = None  # an mlx-lm template module would take precedence
    if fmt == NO_TOOLS:
        return ToolSupport(model, None, "its tool_format is 'none'")
    if fmt:
        found = tool_format(fmt)
    else:
        name = getattr(tokenizer, "init_kwargs", {}).get("tool_parser_type")
        if not isinstance(name, str) or not name:
            return ToolSupport(model, None, "its chat template has no tools block and no tool_format is configured "
                               "(set chat_template and tool_format for it, see docs/http.md)")
        found = tool_format(name)
    if not _renders_tools(tokenizer):
        return ToolSupport(model, None, f"its chat template does not render tools (tool_format {found.name!r}); "
                           "give it a chat_template that does")
    return ToolSupport(model, found)


def encode_prompt(tokenizer: Any, vocab_size: int, prompt: str | None, messages: list[dict[str, Any]] | None,
                  tokens: list[int] | None, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids for a prompt string, chat messages (with ``tools`` for the template) or given ids (validated)."""
    if tokens is not None:
        ids = list(tokens)
    elif messages is not None:
        extra = {"tools": tools} if tools else {}
        ids = list(tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=True, **extra))
    else:
        text = prompt or ""
        bos = getattr(tokenizer, "bos_token", None)
        ids = tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    if any(t >= vocab_size for t in ids):
        raise ValueError(f"prompt_tokens must be < vocab_size={vocab_size}")
    return ids


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: a tool call's ``arguments`` as an object, not JSON text."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_call_for_template(c) for c in calls]}
        out.append(m)
    return out


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        raise ValueError(f"tool call {call.get('id', '')!r}: arguments are not JSON") from None
    return {**call, "function": {**fn, "arguments": args}}
