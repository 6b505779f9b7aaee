"""`mlx-fleet chat` (mlx_fleet/chat.py) against a scripted client: history, Ctrl-C, errors, commands."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from mlx_fleet.chat import Conversation, answer_once, run_chat
from mlx_fleet.client import FleetError

pytestmark = pytest.mark.timeout(10)

INTERRUPT = object()  # in a scripted answer: Ctrl-C arrives at this point


@dataclass
class Chunk:
    text: str


class ScriptedClient:
    """Answers each stream with the next script; records the messages each turn sent."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.sent: list[list[dict[str, str]]] = []

    def stream(self, prompt: Any, *, model: str, messages: list[dict[str, str]], **options: Any) -> Iterator[Chunk]:
        assert prompt is None and model == "m" and options == {"max_tokens": 8}
        self.sent.append(messages)
        answer = self.answers.pop(0)
        if isinstance(answer, FleetError):
            raise answer
        return self._chunks(answer)

    @staticmethod
    def _chunks(parts: list[Any]) -> Iterator[Chunk]:
        for part in parts:
            if part is INTERRUPT:
                raise KeyboardInterrupt
            yield Chunk(part)


def lines(*typed: Any) -> Any:
    """A read_line that returns each typed line (or raises it), then EOF."""
    queue = list(typed)

    def read_line(prompt: str) -> str:
        assert prompt == ">>> "
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return read_line


def chat(client: ScriptedClient, *typed: Any, system: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_chat(client, "m", read_line=lines(*typed), out=out, err=err, options={"max_tokens": 8}, system=system)
    return code, out.getvalue(), err.getvalue()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_history_is_sent_with_every_turn() -> None:
    client = ScriptedClient(["Par", "is."], ["Ber", "lin."])
    code, out, _ = chat(client, "capital of France?", "and Germany?", system="Be brief.")
    assert code == 0 and out == "Paris.\nBerlin.\n\n"
    system = {"role": "system", "content": "Be brief."}
    assert client.sent == [[system, user("capital of France?")],
                           [system, user("capital of France?"), assistant("Paris."), user("and Germany?")]]


def test_ctrl_c_drops_the_turn_and_the_session_goes_on() -> None:
    client = ScriptedClient(["Once", " upon", INTERRUPT, "never"], ["Hi."])
    code, out, err = chat(client, "tell a long story", "hello")
    assert code == 0 and "(answer cancelled)" in err
    assert out.startswith("Once upon\n") and "never" not in out
    assert client.sent[1] == [user("hello")]  # the cancelled question is not in the history


def test_ctrl_c_at_the_prompt_and_commands() -> None:
    client = ScriptedClient(["A."], ["B."])
    code, out, err = chat(client, "one", KeyboardInterrupt(), "", "/clear", "two", "/bye", "never sent")
    assert code == 0 and "Ctrl-D or /bye" in err and "(new conversation)" in err
    assert client.sent == [[user("one")], [user("two")]]


def test_a_fleet_error_is_shown_and_the_turn_dropped() -> None:
    client = ScriptedClient(FleetError("unknown_model", "no model named 'm'"), ["ok"])
    code, out, err = chat(client, "first", "second")
    assert code == 0 and "mlx-fleet: error: unknown_model" in err
    assert client.sent[1] == [user("second")]


def test_one_message_from_stdin() -> None:
    out = io.StringIO()
    client = ScriptedClient(["Paris."])
    assert answer_once(client, "m", "  What is the capital of France?\n", out=out, options={"max_tokens": 8}) == 0
    assert out.getvalue() == "Paris.\n" and client.sent == [[user("What is the capital of France?")]]
    assert answer_once(ScriptedClient([INTERRUPT]), "m", "x", out=io.StringIO(), options={"max_tokens": 8}) == 130


@pytest.mark.parametrize("steps, want", [
    ([("ask", "a")], [user("a")]),
    ([("ask", "a"), ("answered", "b")], [user("a"), assistant("b")]),
    ([("ask", "a"), ("abandon", None)], []),
    ([("ask", "a"), ("answered", "b"), ("abandon", None)], [user("a"), assistant("b")]),
    ([("ask", "a"), ("answered", "b"), ("clear", None)], []),
])
def test_conversation(steps: list[tuple[str, Any]], want: list[dict[str, str]]) -> None:
    convo = Conversation()
    for name, arg in steps:
        getattr(convo, name)(*([] if arg is None else [arg]))
    assert convo.messages == want
