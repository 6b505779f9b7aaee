"""Logprob entries as the protocol carries them: each token with its text and exact bytes. No MLX.

:class:`workers.engine.controls.Rows` computes the numbers; this turns them into the maps
of docs/protocol.md (``{token, token_id, logprob, bytes, top_logprobs}``). A token's
bytes come from llguidance's tokenizer (:meth:`workers.engine.grammar.GrammarCompiler.token_bytes`),
which knows every tokenizer kind's byte mapping; its text is those bytes as UTF-8, with
U+FFFD for a partial character.
"""

from __future__ import annotations

from typing import Any, Callable


class LogprobFormatter:
    """Builds logprob maps; remembers each token's bytes."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._known: dict[int, tuple[str, list[int]]] = {}

    def token(self, token: int, logprob: float) -> dict[str, Any]:
        """One token's map, without alternatives."""
        known = self._known.get(token)
        if known is None:
            raw = self._token_bytes(token)
            known = self._known[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return {"token": known[0], "token_id": token, "logprob": logprob, "bytes": known[1]}

    def entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        """A generated token's map with its ``top_logprobs`` (already sorted, most likely first)."""
        out = self.token(token, logprob)
        out["top_logprobs"] = [self.token(t, lp) for t, lp in top]
        return out
