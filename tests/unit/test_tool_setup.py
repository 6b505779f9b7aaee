"""A model's chat template and tool format: the config keys and flags, and how a worker sets them up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jinja2 import Environment

from actors.config import ConfigError
from actors.config_load import load_config
from mlx_fleet.cli import build_parser, config_from_args
from workers.engine.tool_setup import defaults_for, setup_tools, template_messages, template_text, tool_format

pytestmark = pytest.mark.timeout(30)


def test_toml_keys_and_cli_flags(tmp_path: Path) -> None:
    toml = tmp_path / "fleet.toml"
    toml.write_text('[[models]]\nname = "a"\nsource = "demo"\nchat_template = "smollm2-tools"\n'
                    'tool_format = "json_tools"\n[[models]]\nname = "b"\nsource = "demo"\n')
    cfg = load_config(toml, env={})
    assert (cfg.model("a").chat_template, cfg.model("a").tool_format) == ("smollm2-tools", "json_tools")
    assert (cfg.model("b").chat_template, cfg.model("b").tool_format) == ("", "")
    args = build_parser().parse_args(["up", "--config", str(toml), "--chat-template", "b=/t/x.jinja",
                                      "--tool-format", "b=mistral", "--tool-format", "a=none"])
    cfg = config_from_args(args)
    assert (cfg.model("b").chat_template, cfg.model("b").tool_format, cfg.model("a").tool_format) == (
        "/t/x.jinja", "mistral", "none")
    with pytest.raises(ConfigError, match="no model named 'c'"):
        config_from_args(build_parser().parse_args(["up", "--config", str(toml), "--tool-format", "c=json_tools"]))
    worker = build_parser().parse_args(["worker", "--connect", "tcp://h:5556", "--model", "a=demo",
                                        "--chat-template", "smollm2-tools", "--tool-format", "json_tools"])
    assert (worker.chat_template, worker.tool_format) == ("smollm2-tools", "json_tools")
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        config_from_args(build_parser().parse_args(["up", "--chat-template", "smollm2-tools"]))


def test_the_built_in_smollm2_gets_the_shipped_template_unless_told_otherwise() -> None:
    assert defaults_for("smollm2", "", "") == ("smollm2-tools", "json_tools")
    assert defaults_for("smollm2", "", "none") == ("", "none")
    assert defaults_for("/m/smollm2.gguf", "", "") == ("", "")


def test_templates_and_formats_by_name() -> None:
    assert "<tool_call>" in template_text("smollm2-tools")
    with pytest.raises(ValueError, match="cannot read"):
        template_text("/no/such/template.jinja")
    assert tool_format("json_tools").call_start == "<tool_call>"
    for bad in ("no_such_parser", "../x"):
        with pytest.raises(ValueError, match="tool_format"):
            tool_format(bad)


class FakeTokenizer:
    """What setup_tools touches: the template (rendered with jinja2, as Hugging Face does) and init_kwargs."""

    def __init__(self, template: str, parser: str | None = None) -> None:
        self.chat_template = template
        self._chat_template: Any = object()
        self.init_kwargs = {"tool_parser_type": parser} if parser else {}

    def apply_chat_template(self, messages: list[dict[str, Any]], *, tools: Any = None, tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        env = Environment()
        return env.from_string(self.chat_template).render(messages=messages, tools=tools,
                                                          add_generation_prompt=add_generation_prompt)


PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
WITH_TOOLS = "{% if tools %}tools: {{ tools | length }}\n{% endif %}" + PLAIN


@pytest.mark.parametrize("template, parser, fmt, chat_template, why", [
    (PLAIN, None, "", "", "no tools block"),
    (PLAIN, None, "json_tools", "", "does not render tools"),
    (WITH_TOOLS, "json_tools", "none", "", "'none'"),
])
def test_a_model_that_cannot_call_tools_says_why(template: str, parser: Any, fmt: str, chat_template: str,
                                                  why: str) -> None:
    support = setup_tools(FakeTokenizer(template, parser), model="m", chat_template=chat_template, fmt=fmt)
    assert support.format is None and why in support.why and support.model == "m"


def test_a_model_calls_tools_with_its_own_format_or_the_configured_one(tmp_path: Path) -> None:
    assert setup_tools(FakeTokenizer(WITH_TOOLS, "json_tools"), model="m").format is not None
    tok = FakeTokenizer(PLAIN)
    path = tmp_path / "t.jinja"
    path.write_text(WITH_TOOLS)
    support = setup_tools(tok, model="m", chat_template=str(path), fmt="mistral")
    assert support.format is not None and support.format.name == "mistral"
    assert tok.chat_template == WITH_TOOLS and tok._chat_template is None


def test_tool_call_arguments_reach_the_template_as_objects() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    (m,) = template_messages([{"role": "assistant", "content": "", "tool_calls": [call]}])
    assert m["tool_calls"][0]["function"]["arguments"] == {"a": 1}
