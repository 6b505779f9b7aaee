"""Decoding controls as batched array operations over the rows that ask for them.

mlx-lm's per-sequence ``logits_processors`` send every row of a batch through a Python
loop once one row has a processor, and a processor that needs the previous token as an
int waits for it, which breaks the one-step overlap. Here instead, for one step of a
batch (:class:`Plan`, made by :class:`Rows` for the batch's rows in order):

- penalties: a count matrix of the generated tokens of the penalised rows, updated with
  one scatter-add of the step's input tokens (still lazy: no wait), then a few
  element-wise ops; ``logit_bias``: a dense bias row per request, added. One gather and
  one scatter-add over just those rows.
- grammars: the step's forward pass is started (``async_eval``), the previous tokens are
  read (they are done: they came out of the previous step), the rows' matchers consume
  them, llguidance fills their bitmasks in its own threads and numpy unpacks them, all
  while the forward pass runs; the masks then go in with one ``mx.where``.
- ``min_p``: a per-row threshold below the row's top logit, one more masked add.
- logprobs: for the rows that ask, the log-softmax of the *raw* logits, the sampled
  token's entry and an ``argpartition`` top-k, computed with the step and read at the
  next one, when the engine reads the token itself.

Rows that use none of this cost nothing: a batch whose rows have no controls takes
mlx-lm's own step (:mod:`workers.engine.batch`), and in a mixed batch the other rows are
never gathered and still share one sampler call.

Every call comes from the engine's MLX thread.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx

from actors.clock import Clock
from workers.engine.grammar import GrammarState, MaskFiller
from workers.engine.interface import Controls
from workers.engine.stats import StepStats


@dataclass
class LogprobEntry:
    """One generated token's logprob under the model's own distribution, and the top alternatives."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Row:
    """One sequence's controls and their state."""

    controls: Controls
    bias: mx.array | None = None  # dense (vocab,) bias, or None
    grammar: GrammarState | None = None
    counts: mx.array | None = None  # (vocab,) times each token was generated (penalised rows)
    started: bool = False  # its first step ran: later step inputs are generated tokens
    entries: deque[LogprobEntry] = field(default_factory=deque)  # logprobs ready for the engine

    @property
    def adjusts(self) -> bool:
        """Whether its logits get penalties or a bias."""
        return self.controls.penalised or self.bias is not None


def make_row(controls: Controls, vocab_size: int, grammar: GrammarState | None) -> Row:
    """A row for a new sequence: its dense bias row built once."""
    bias = None
    if controls.logit_bias:
        ids = sorted(controls.logit_bias)
        bias = mx.zeros((vocab_size,), dtype=mx.float32).at[mx.array(ids)].add(
            mx.array([controls.logit_bias[i] for i in ids], dtype=mx.float32))
    return Row(controls, bias, grammar)


class Plan:
    """The controls of one batch, its rows in order; rebuilt when the batch's rows change."""

    def __init__(self, rows: list[Row | None], vocab_size: int, filler: MaskFiller | None) -> None:
        self.vocab_size = vocab_size
        self.filler = filler
        self.adjust_rows = [(i, r) for i, r in enumerate(rows) if r is not None and r.adjusts]
        self.grammar_rows = [(i, r) for i, r in enumerate(rows) if r is not None and r.grammar is not None]
        self.min_p_rows = [(i, r) for i, r in enumerate(rows) if r is not None and r.controls.min_p > 0]
        self.logprob_rows = [(i, r) for i, r in enumerate(rows) if r is not None and r.controls.logprobs]
        self.rows = [r for r in rows if r is not None]
        self.counts: mx.array | None = None
        if self.adjust_rows:
            self._make_adjust()
        self.m_idx = mx.array([i for i, _ in self.min_p_rows])
        self.m_floor = mx.array([[math.log(r.controls.min_p)] for _, r in self.min_p_rows])
        self.l_idx = mx.array([i for i, _ in self.logprob_rows])
        self.top_k = max((r.controls.top_logprobs for _, r in self.logprob_rows), default=0)
        self.mask_s = 0.0  # last constrain() call: consuming tokens and filling masks

    def _make_adjust(self) -> None:
        rows = [r for _, r in self.adjust_rows]
        self.a_idx = mx.array([i for i, _ in self.adjust_rows])
        self.penalised = any(r.controls.penalised for r in rows)
        if self.penalised:
            zero = mx.zeros((self.vocab_size,), dtype=mx.float32)
            self.counts = mx.stack([zero if r.counts is None else r.counts for r in rows])
            self.rep = mx.array([[r.controls.repetition_penalty or 1.0] for r in rows])
            self.has_rep = any((r.controls.repetition_penalty or 1.0) != 1.0 for r in rows)
            self.freq = mx.array([[r.controls.frequency_penalty] for r in rows])
            self.pres = mx.array([[r.controls.presence_penalty] for r in rows])
            self.started = mx.array([1.0 if r.started else 0.0 for r in rows])
        biased = [r.bias for r in rows]
        self.bias = None
        if any(b is not None for b in biased):
            zero = mx.zeros((self.vocab_size,), dtype=mx.float32)
            self.bias = mx.stack([zero if b is None else b for b in biased])

    @property
    def constrained(self) -> bool:
        """Whether some row follows a grammar (the step then reads its input tokens before sampling)."""
        return bool(self.grammar_rows)

    def adjust(self, logits: mx.array, inputs: mx.array) -> mx.array:
        """Penalties and biases on their rows (lazy); ``inputs`` are the step's input tokens."""
        if not self.adjust_rows:
            return logits
        sub = logits[self.a_idx]
        delta = mx.zeros_like(sub) if self.bias is None else self.bias
        if self.penalised:
            assert self.counts is not None
            n = len(self.adjust_rows)
            self.counts = self.counts.at[mx.arange(n), inputs[self.a_idx]].add(self.started)
            present = self.counts > 0
            if self.has_rep:
                delta = delta + mx.where(present, mx.where(sub > 0, sub / self.rep, sub * self.rep) - sub, 0.0)
            delta = delta - self.freq * self.counts - self.pres * present
        return logits.at[self.a_idx].add(delta.astype(logits.dtype))

    def constrain(self, logits: mx.array, tokens: list[int], eos_ids: set[int], clock: Clock) -> mx.array:
        """Feed the rows' matchers their last token, fill their masks, and mask their logits."""
        assert self.filler is not None
        t0 = clock.now()
        states: list[GrammarState] = []
        for i, row in self.grammar_rows:
            assert row.grammar is not None
            if row.started and tokens[i] not in eos_ids:
                row.grammar.consume(tokens[i])
            states.append(row.grammar)
        allowed = self.filler.dense(self.filler.fill(states), [i for i, _ in self.grammar_rows], logits.shape[0],
                                    logits.shape[-1])
        self.mask_s = clock.now() - t0
        # One where over the batch (rows without a grammar allow everything): no gather, no scatter.
        return mx.where(mx.array(allowed), logits, mx.array(-math.inf, dtype=logits.dtype))

    def min_p(self, logits: mx.array) -> mx.array:
        """Drop, on its rows, tokens less likely than ``min_p`` times the row's most likely one."""
        if not self.min_p_rows:
            return logits
        sub = logits[self.m_idx]
        cut = sub < mx.max(sub, axis=-1, keepdims=True) + self.m_floor
        return logits.at[self.m_idx].add(mx.where(cut, -math.inf, 0.0).astype(logits.dtype))

    def logprobs(self, raw: mx.array, sampled: mx.array) -> tuple[list[Row], list[mx.array]] | None:
        """The logprob arrays of the rows that ask (from the raw logits), to read at the next step."""
        if not self.logprob_rows:
            return None
        sub = raw[self.l_idx].astype(mx.float32)
        lp = sub - mx.logsumexp(sub, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(lp, sampled[self.l_idx][:, None], axis=-1)[:, 0]
        arrays = [chosen]
        k = self.top_k
        if k:
            top = mx.argpartition(-lp, k - 1, axis=-1)[:, :k]
            arrays += [top, mx.take_along_axis(lp, top, axis=-1)]
        return [r for _, r in self.logprob_rows], arrays

    def advance(self) -> None:
        """The step was taken: every row's later inputs are generated tokens."""
        for row in self.rows:
            row.started = True
        if self.adjust_rows and self.penalised:
            self.started = mx.ones((len(self.adjust_rows),))

    def unstack(self) -> None:
        """Hand each penalised row its counts back (the plan is about to be dropped)."""
        if self.counts is not None:
            for k, (_, row) in enumerate(self.adjust_rows):
                if row.controls.penalised:
                    row.counts = self.counts[k]


class Rows:
    """The controlled sequences of one engine, by uid, and the plan of the batch in flight."""

    def __init__(self, vocab_size: int, filler: MaskFiller | None, eos_ids: set[int], clock: Clock,
                 stats: StepStats) -> None:
        self.vocab_size = vocab_size
        self.filler = filler
        self.eos_ids = eos_ids
        self.clock = clock
        self.stats = stats
        self.rows: dict[int, Row] = {}
        self._plan: Plan | None = None
        self._plan_uids: tuple[int, ...] = ()
        self._pending: list[tuple[list[Row], list[mx.array]]] = []  # logprobs computed, not yet read

    def __bool__(self) -> bool:
        return bool(self.rows)

    def add(self, uid: int, row: Row) -> None:
        """A new controlled sequence."""
        self._drop_plan()
        self.rows[uid] = row

    def pop(self, uid: int) -> Row | None:
        """Forget a sequence (finished or removed)."""
        if uid in self.rows:
            self._drop_plan()
        row = self.rows.pop(uid, None)
        if not self.rows:
            self._pending.clear()  # logprobs of tokens no one will read
        return row

    def rename(self, old: int, new: int) -> None:
        """A sequence moved (the solo handoff): its state goes on under ``new``; its unread logprobs are dropped."""
        row = self.pop(old)
        if row is not None:
            row.started = False  # the new first step's input is the last token it already counted and fed
            row.entries.clear()
            self._pending = [(rows, arrays) for rows, arrays in self._pending if row not in rows]
            self.rows[new] = row

    def take_entry(self, uid: int) -> LogprobEntry | None:
        """The next logprob entry of ``uid`` (its token's), or None when it asked for none."""
        row = self.rows.get(uid)
        return row.entries.popleft() if row is not None and row.entries else None

    def plan(self, uids: list[int]) -> Plan | None:
        """The plan for a batch with these uids in this order; None when none of them has controls."""
        if not self.rows:
            return None
        key = tuple(uids)
        if self._plan is None or key != self._plan_uids:
            self._drop_plan()
            rows = [self.rows.get(u) for u in uids]
            if not any(r is not None for r in rows):
                return None
            self._plan, self._plan_uids = Plan(rows, self.vocab_size, self.filler), key
        return self._plan

    def _drop_plan(self) -> None:
        if self._plan is not None:
            self._plan.unstack()
            self._plan, self._plan_uids = None, ()

    def keep_logprobs(self, pending: tuple[list[Row], list[mx.array]] | None) -> list[mx.array]:
        """Hold a step's logprob arrays until the next step reads them; returns them, to evaluate with the step."""
        if pending is None:
            return []
        self._pending.append(pending)
        return pending[1]

    def read_logprobs(self) -> None:
        """Turn the logprobs held from the previous step into entries on their rows (their tokens are out now)."""
        if not self._pending:
            return
        t0 = self.clock.now()
        pending, self._pending = self._pending, []
        mx.eval([a for _, arrays in pending for a in arrays])
        for rows, arrays in pending:
            chosen = cast(list[float], arrays[0].tolist())
            tops = None
            if len(arrays) == 3:
                tops = (cast(list[list[int]], arrays[1].tolist()), cast(list[list[float]], arrays[2].tolist()))
            for k, row in enumerate(rows):
                top: list[tuple[int, float]] = []
                if tops is not None and row.controls.top_logprobs:
                    pairs = sorted(zip(tops[0][k], tops[1][k]), key=lambda p: -p[1])
                    top = [(int(t), float(v)) for t, v in pairs[: row.controls.top_logprobs]]
                row.entries.append(LogprobEntry(float(chosen[k]), top))
        self.stats.logprobs_s += self.clock.now() - t0
