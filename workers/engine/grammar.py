"""Grammar-constrained decoding with llguidance: compiling requests' grammars and filling token masks.

No MLX here: compiling runs off the MLX thread (the worker's compile pool), and the mask
fill writes a numpy bitmask that :mod:`workers.engine.controls` applies with ``mx`` ops.

- :class:`GrammarCompiler`, one per loaded model: it builds llguidance's ``LLTokenizer``
  from the model's ``tokenizers`` JSON once (lazily, under a lock; about a second on a
  large vocabulary) and compiles a request's ``grammar`` map (docs/protocol.md) into a
  :class:`Grammar`. A grammar llguidance refuses raises :class:`GrammarError` with
  llguidance's own message.
- :class:`Grammar`: one compiled grammar; :meth:`Grammar.start` gives each completion its
  own :class:`GrammarState` (a copy of the compiled matcher).
- :class:`MaskFiller`: fills the bitmasks of many rows at once in llguidance's own threads
  (``LLExecutor``), which drop the GIL, so the fill runs while MLX computes the forward pass.

The bitmask has one bit per id of the model's logits (``n_vocab``: the logits may be wider
than the tokenizer's vocabulary; ids past it are never allowed). When the grammar is
complete, only end-of-sequence is allowed.

Thinking models: where the tokenizer has reasoning markers (mlx-lm's ``think_start`` /
``think_end``), a completion that starts inside a reasoning block (the prompt opened one and
did not close it), or whose first token opens one, is unconstrained until the block closes;
the grammar starts at the token after the marker.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy as llnp
import numpy as np

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# JSON as OpenAI's models write it ({"a": 1, "b": [2, 3]}), with no other whitespace: a free choice
# of whitespace lets a weak model spend its tokens on it. A schema's "x-guidance" map may override.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar llguidance cannot compile; the message is llguidance's."""


@dataclass(frozen=True)
class ThinkMarkers:
    """The token ids that open and close a reasoning block."""

    start: tuple[int, ...]
    end: tuple[int, ...]


def think_markers(tokenizer: Any) -> ThinkMarkers | None:
    """The reasoning markers of an mlx-lm ``TokenizerWrapper``, or None for a model without them."""
    if not getattr(tokenizer, "has_thinking", False):
        return None
    start, end = tuple(tokenizer.think_start_tokens or ()), tuple(tokenizer.think_end_tokens or ())
    return ThinkMarkers(start, end) if start and end else None


def _ends_with(tokens: list[int], marker: tuple[int, ...]) -> bool:
    return len(tokens) >= len(marker) and tuple(tokens[len(tokens) - len(marker):]) == marker


def _rfind(tokens: list[int], marker: tuple[int, ...]) -> int:
    n = len(marker)
    for i in range(len(tokens) - n, -1, -1):
        if tuple(tokens[i:i + n]) == marker:
            return i
    return -1


class GrammarState:
    """One completion's place in its grammar: a matcher, and the reasoning gate before it."""

    def __init__(self, matcher: llguidance.LLMatcher, think: ThinkMarkers | None, prompt_tokens: list[int]) -> None:
        self.matcher = matcher
        self.think = think
        self.thinking = False  # inside a reasoning block: unconstrained
        self.may_think = False  # the next token may open a reasoning block instead
        self._tail: list[int] = []  # the last tokens while reasoning, to spot an end marker of several
        if think is not None:
            opened = _rfind(prompt_tokens, think.start)
            self.thinking = opened >= 0 and _rfind(prompt_tokens, think.end) < opened
            self.may_think = not self.thinking

    @property
    def constrained(self) -> bool:
        """Whether the grammar decides the next token (False while reasoning)."""
        return not self.thinking

    def consume(self, token: int) -> None:
        """The completion generated ``token``: advance the reasoning gate or the matcher."""
        if self.think is not None:
            if self.thinking:
                self._tail = (self._tail + [token])[-len(self.think.end):]
                if _ends_with(self._tail, self.think.end):
                    self.thinking, self._tail = False, []
                return
            if self.may_think:
                self.may_think = False
                if token == self.think.start[0]:  # the rest of a longer marker comes while unconstrained
                    self.thinking = True
                    return
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete: only end-of-sequence may follow."""
        return self.matcher.is_stopped()

    def output_matches(self) -> bool:
        """Whether what was consumed so far is a complete match."""
        return self.matcher.is_accepting() and not self.matcher.is_error()


class Grammar:
    """A compiled grammar; each completion starts its own state from it."""

    def __init__(self, matcher: llguidance.LLMatcher, think: ThinkMarkers | None) -> None:
        self._matcher = matcher
        self.think = think

    def start(self, prompt_tokens: list[int]) -> GrammarState:
        """A fresh state for one completion of a prompt (its tokens decide the reasoning gate)."""
        return GrammarState(self._matcher.deep_copy(), self.think, prompt_tokens)


def grammar_text(spec: dict[str, Any]) -> str:
    """llguidance's grammar for a request's ``grammar`` map (already validated by the protocol)."""
    kind = spec["type"]
    try:
        if kind == "json_schema":
            return str(llguidance.LLMatcher.grammar_from_json_schema(spec["schema"], defaults=JSON_OPTIONS))  # type: ignore[arg-type]
        if kind == "json_object":
            return str(llguidance.LLMatcher.grammar_from_json_schema(JSON_OBJECT_SCHEMA, defaults=JSON_OPTIONS))  # type: ignore[arg-type]
        if kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(spec["pattern"]))
        if kind == "lark":
            return str(llguidance.LLMatcher.grammar_from_lark(spec["grammar"]))
        if kind == "choice":
            return str(llguidance.grammar_from("choice", json.dumps(spec["choices"])))
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None
    raise GrammarError(f"unknown grammar type {kind!r}")


class GrammarCompiler:
    """One model's llguidance tokenizer (built once, on first use) and its grammar compiler. Thread-safe."""

    def __init__(self, hf_tokenizer: Any, *, n_vocab: int, eos_ids: list[int], think: ThinkMarkers | None) -> None:
        self._hf = hf_tokenizer
        self.n_vocab = n_vocab
        self.eos_ids = sorted(eos_ids)
        self.think = think
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's tokenizer for the model, built from its ``tokenizers`` JSON on first use."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.n_vocab, eos_token=self.eos_ids)
            return self._tokenizer

    def compile(self, spec: dict[str, Any]) -> Grammar:
        """Compile a request's ``grammar`` map; raises :class:`GrammarError` with llguidance's message."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Grammar(matcher, self.think)

    def token_bytes(self, token: int) -> bytes:
        """A token's exact bytes (empty for ids past the tokenizer's vocabulary)."""
        return bytes(self.tokenizer.decode_bytes([token]))


class MaskFiller:
    """Fills the bitmasks of a batch's constrained rows in parallel (one call, llguidance's threads)."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.words = (n_vocab + 31) // 32
        self._executor = llguidance.LLExecutor()
        self._buffer = np.zeros((0, self.words), dtype=np.int32)
        self._dense = np.ones((0, n_vocab), dtype=np.bool_)

    def fill(self, states: list[GrammarState]) -> np.ndarray:
        """One int32 bitmask row per state (bit ``t`` of word ``t // 32`` allows token ``t``); a view, reused."""
        if self._buffer.shape[0] < len(states):
            self._buffer = np.zeros((max(len(states), 2 * self._buffer.shape[0]), self.words), dtype=np.int32)
        mask = self._buffer[: len(states)]
        work = [(s.matcher, i) for i, s in enumerate(states) if s.constrained]
        if work:
            llnp.fill_next_token_bitmask_par(self._executor, work, mask)
        for i, s in enumerate(states):
            if not s.constrained:
                mask[i] = -1  # reasoning: anything goes (ids past the vocabulary are cut when applied)
            elif s.may_think and s.think is not None:
                t = s.think.start[0]
                mask.view(np.uint32)[i, t // 32] |= np.uint32(1 << (t % 32))
        return mask

    def dense(self, packed: np.ndarray, rows: list[int], batch: int, width: int) -> np.ndarray:
        """A ``(batch, width)`` boolean mask: row ``rows[i]`` from ``packed[i]``, every other row all allowed.

        ``width`` is the logits' (ids past ``n_vocab`` are never allowed); a view, reused.
        """
        bits = np.unpackbits(packed.view(np.uint8), axis=1, count=min(width, packed.shape[1] * 32),
                             bitorder="little").view(np.bool_)
        if len(rows) == batch and width == bits.shape[1]:
            return bits
        if self._dense.shape[0] < batch or self._dense.shape[1] != width:
            self._dense = np.ones((max(batch, 2 * self._dense.shape[0]), width), dtype=np.bool_)
        out = self._dense[:batch]
        out[:] = True
        out[rows, bits.shape[1]:] = False
        out[rows, : bits.shape[1]] = bits
        return out
