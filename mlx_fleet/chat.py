"""`mlx-fleet chat`: a conversation with a served model in the terminal.

The history is kept as chat ``messages`` and sent whole with each turn, so the
model's chat template formats it (and a worker's prompt cache reuses the shared
prefix). Answers stream as they are generated. Ctrl-C during an answer cancels it
in the fleet and drops that turn; the session goes on. Ctrl-D or ``/bye`` ends it,
``/clear`` starts a new conversation.

With stdin not a terminal (``echo "..." | mlx-fleet chat``), all of stdin is one
message: it is answered and the command exits.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Any, Callable, TextIO

HELP = "Type a message. /clear starts over, /bye (or Ctrl-D) leaves, Ctrl-C stops an answer."


class Conversation:
    """The messages so far: what the next turn sends."""

    def __init__(self, system: str | None = None) -> None:
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.clear()

    def clear(self) -> None:
        """Forget every turn (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str) -> list[dict[str, str]]:
        """Add the user's message; return the messages to send."""
        self.messages.append({"role": "user", "content": text})
        return list(self.messages)

    def answered(self, text: str) -> None:
        """Add the model's answer to the last question."""
        self.messages.append({"role": "assistant", "content": text})

    def abandon(self) -> None:
        """Drop the last question (its answer was cancelled or failed)."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()


def stream_answer(client: Any, model: str, messages: list[dict[str, str]], out: TextIO,
                  options: dict[str, Any]) -> str | None:
    """Stream one answer to ``out``; its text, or None when Ctrl-C cancelled it.

    The client's stream cancels the request in the fleet when interrupted.
    Fleet errors propagate to the caller.
    """
    parts: list[str] = []
    try:
        for chunk in client.stream(None, model=model, messages=messages, **options):
            out.write(chunk.text)
            out.flush()
            parts.append(chunk.text)
    except KeyboardInterrupt:
        out.write("\n")
        return None
    out.write("\n")
    out.flush()
    return "".join(parts)


def run_chat(client: Any, model: str, *, read_line: Callable[[str], str], out: TextIO, err: TextIO,
             options: dict[str, Any], system: str | None = None) -> int:
    """The interactive loop: prompt, answer, repeat until EOF or ``/bye``. Returns 0."""
    from mlx_fleet.client import FleetError

    convo = Conversation(system)
    err.write(f"chatting with {model}. {HELP}\n")
    while True:
        try:
            text = read_line(">>> ").strip()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            err.write("\n(Ctrl-D or /bye to leave)\n")
            continue
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if text == "/clear":
            convo.clear()
            err.write("(new conversation)\n")
            continue
        if text in ("/?", "/help"):
            err.write(HELP + "\n")
            continue
        try:
            answer = stream_answer(client, model, convo.ask(text), out, options)
        except FleetError as exc:
            convo.abandon()
            err.write(f"\nmlx-fleet: error: {exc}\n")
            continue
        if answer is None:
            convo.abandon()
            err.write("(answer cancelled)\n")
        else:
            convo.answered(answer)


def answer_once(client: Any, model: str, text: str, *, out: TextIO, options: dict[str, Any],
                system: str | None = None) -> int:
    """Answer one message (stdin not a terminal); 0, or 130 when interrupted."""
    convo = Conversation(system)
    return 0 if stream_answer(client, model, convo.ask(text.strip()), out, options) is not None else 130


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """The `chat` command's own options (the CLI adds how to reach the fleet)."""
    parser.add_argument("--model", default="chat", help="the served model's name (default: chat)")
    parser.add_argument("--system", help="a system message to start the conversation with")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int)


def chat_command(args: argparse.Namespace, make_client: Callable[[], Any]) -> int:
    """Run `mlx-fleet chat`: interactive on a terminal, one answer otherwise. Exit status as for `generate`."""
    from mlx_fleet.client import FleetError

    options: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        options["seed"] = args.seed
    try:
        with make_client() as client:
            if not sys.stdin.isatty():
                text = sys.stdin.read()
                if not text.strip():
                    print("mlx-fleet: error: no message on stdin", file=sys.stderr)
                    return 1
                return answer_once(client, args.model, text, out=sys.stdout, options=options, system=args.system)
            try:
                importlib.import_module("readline")  # line editing and history for input()
            except ImportError:
                pass
            # Ctrl-C is how an answer is cancelled: make it raise even when the shell that
            # started us ignored SIGINT (a command put in the background by a script does).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            return run_chat(client, args.model, read_line=input, out=sys.stdout, err=sys.stderr,
                            options=options, system=args.system)
    except FleetError as exc:
        print(f"mlx-fleet: error: {exc}", file=sys.stderr)
        return 1
