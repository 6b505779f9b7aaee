"""mlx-lm's ``BatchGenerator`` with decoding controls in its step (:mod:`workers.engine.controls`).

:class:`ControlledBatchGenerator` is ``BatchGenerator`` whose prompt and generation batches
are the subclasses below. :class:`ControlledGenerationBatch` overrides the one step:

- a batch none of whose rows has controls runs mlx-lm's own ``_step``, unchanged;
- otherwise the step is mlx-lm's with the controls between the logits and the sampler.
  It keeps mlx-lm's one-step overlap: the next step is in flight (``async_eval``) before
  the step waits for the tokens it returns. With a grammar row, the forward pass is
  started first and the masks are filled while it runs; only the (small) sampling waits
  for them.

The first step of a new sequence runs when mlx-lm moves it from prompt processing to
generation (``PromptProcessingBatch.generate``, overridden to build our batch); its input
is the prompt's last token, or after a solo handoff a token the solo path already
counted, so a row's first step input is never counted or fed to its grammar.

:class:`ControlledBatchGenerator` can also run prefill first: while prompts wait, the decoding
sequences sit out the steps that prefill them, up to a bound in prompt tokens.

Written against mlx-lm 0.32.2's ``BatchGenerator`` (its ``_prompt_batch``,
``_generation_batch``, ``_unprocessed_sequences``, ``_counters`` and ``_stream`` attributes,
``PromptProcessingBatch._copy`` and ``generate``); tests/integration/test_controls.py checks
the plain path gives mlx-lm's own tokens, tests/integration/test_prefill_first.py that prefill
first changes no token.
"""

from __future__ import annotations

from typing import Any, Callable, cast

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch

from workers.engine.controls import Plan, Rows


Sampler = Callable[[mx.array], mx.array]


def sample_rows(samplers: list[Sampler | None], fallback: Sampler, logprobs: mx.array) -> mx.array:
    """One sampler call when every row shares one sampler (mlx-lm's rule), else one per row."""
    chosen = [fallback if s is None else s for s in samplers]
    if not chosen or all(s is chosen[0] for s in chosen):
        return (chosen[0] if chosen else fallback)(logprobs)
    return mx.concatenate([s(logprobs[e: e + 1]) for e, s in enumerate(chosen)], axis=0)


def controlled_sample(plan: Plan, rows: Rows, raw: mx.array, inputs: mx.array,
                      sample: Sampler) -> tuple[mx.array, mx.array, list[int] | None, list[mx.array]]:
    """From a step's raw logits to its sampled tokens, with the plan's controls.

    Returns the sampled tokens, the log-probabilities they were sampled from, the input
    tokens as ints when a grammar made the step read them, and the logprob arrays to
    evaluate with the step.
    """
    logits = plan.adjust(raw, inputs)
    tokens = None
    if plan.constrained:
        mx.async_eval(logits)  # the forward pass runs while the masks are filled
        mx.eval(inputs)  # done already: the previous step produced them
        tokens = cast(list[int], inputs.tolist())
        logits = plan.constrain(logits, tokens, rows.eos_ids, rows.clock)
        rows.stats.mask_s += plan.mask_s
        rows.stats.masked_steps += 1
    logits = plan.min_p(logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    sampled = sample(logprobs)
    extra = rows.keep_logprobs(plan.logprobs(raw, sampled))
    plan.advance()
    return sampled, logprobs, tokens, extra


class ControlledGenerationBatch(GenerationBatch):
    """mlx-lm's generation batch; a step with controlled rows applies their controls."""

    rows: Rows

    def __init__(self, *args: Any, rows: Rows | None = None, **kwargs: Any) -> None:
        if rows is not None:
            self.rows = rows  # before mlx-lm's __init__, which takes the first step
        self._reading = False
        super().__init__(*args, **kwargs)

    def next(self) -> list[Any]:
        """mlx-lm's ``next``; its step also reads the logprobs of the tokens it returns."""
        self._reading = True
        try:
            return cast(list[Any], super().next())
        finally:
            self._reading = False

    def _step(self) -> tuple[list[int], list[mx.array]]:
        plan = self.rows.plan(self.uids)
        if plan is None:
            return super()._step()
        # mlx-lm declares none of these attributes' types (``_current_tokens`` starts as None).
        me: Any = self
        me._current_tokens = me._next_tokens
        me._current_logprobs = me._next_logprobs
        inputs: mx.array = me._current_tokens
        raw = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
        samplers: list[Sampler | None] = list(me.samplers or [None] * len(self.uids))
        fallback: Sampler = me.fallback_sampler
        sampled, logprobs, tokens, extra = controlled_sample(
            plan, self.rows, raw, inputs, lambda lp: sample_rows(samplers, fallback, lp))
        me._next_tokens = sampled
        me._next_logprobs = list(logprobs)
        mx.async_eval(sampled, me._next_logprobs, extra)
        mx.eval(inputs, me._current_logprobs)
        if self._reading:  # a sequence's first step (inside prompt processing) returns no token
            self.rows.read_logprobs()
        values = tokens if tokens is not None else cast(list[int], inputs.tolist())
        for sti, ti in zip(self.tokens, values):
            sti.append(ti)
        return values, cast(list[mx.array], me._current_logprobs)


class ControlledPromptBatch(PromptProcessingBatch):
    """mlx-lm's prompt batch, handing its sequences to a :class:`ControlledGenerationBatch`."""

    rows: Rows

    def _copy(self) -> "ControlledPromptBatch":
        new = cast(ControlledPromptBatch, super()._copy())  # type: ignore[no-untyped-call]  # mlx-lm's, unannotated
        new.rows = self.rows
        return new

    def generate(self, tokens: list[list[int]]) -> ControlledGenerationBatch:
        """As mlx-lm's: prefill all but each last token, then start generating from it."""
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        generation = ControlledGenerationBatch(
            self.model, self.uids, mx.array([t[-1] for t in tokens]), self.prompt_cache, self.tokens,
            self.samplers, self.fallback_sampler, self.logits_processors, self.stop_sequences, self.max_tokens,
            rows=self.rows)
        self.uids, self.prompt_cache, self.tokens, self.samplers = [], [], [], []
        self.logits_processors, self.max_tokens = [], []
        return generation


class ControlledBatchGenerator(BatchGenerator):
    """``BatchGenerator`` whose batches apply the decoding controls of ``rows``.

    With ``prefill_first_tokens`` > 0, a call while prompts wait and sequences decode runs the
    prompts' step alone (:meth:`_prompts_only`): the decoding sequences skip it, and a group
    whose prefill completes returns its first tokens in that same call. mlx-lm's own ``next``
    would also take a decode step of everyone in each such call, and return the new group's
    first tokens only after the next group's prefill chunk. Decoding pauses for at most
    ``prefill_first_tokens`` prompt tokens; past them, mlx-lm's own steps run until no prompt
    waits. The bound counts tokens, not time, so every rank of a sharded group, applying the
    same operations to the same tokens, takes the same steps.
    """

    def __init__(self, model: Any, *, rows: Rows, prefill_first_tokens: int = 0, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.rows = rows
        prompt = ControlledPromptBatch.empty(self.model, self.sampler, prefill_step_size=self.prefill_step_size)
        prompt.rows = rows
        self._prompt_batch = prompt
        self._generation_batch = self._empty_generation()
        self.prefill_first_tokens = prefill_first_tokens
        self._paused_tokens = 0  # prompt tokens prefilled while decoding paused, since no prompt last waited

    def next(self) -> Any:
        """One step: mlx-lm's, or the waiting prompts' alone (see the class doc)."""
        me: Any = self  # mlx-lm's private state: the prompts not started, and those being prefilled
        if not me._unprocessed_sequences and not len(self._prompt_batch):
            self._paused_tokens = 0  # no prompt waits: the next ones may pause decoding again
        elif (self._paused_tokens < self.prefill_first_tokens
              and 0 < len(self._generation_batch) < self.completion_batch_size):
            before = me._counters.prompt_tokens
            out = self._prompts_only()
            self._paused_tokens += me._counters.prompt_tokens - before
            return out
        return super().next()  # type: ignore[no-untyped-call]  # mlx-lm's, unannotated

    def _empty_generation(self) -> Any:
        """An empty generation batch that applies the controls of ``rows``."""
        batch = ControlledGenerationBatch.empty(self.model, self.sampler)
        batch.rows = self.rows
        return batch

    def _prompts_only(self) -> Any:
        """mlx-lm's step with the decoding sequences set aside: prompt chunks only; a group that
        completes its prefill takes its first step here, then joins the decoding sequences."""
        held, fresh = self._generation_batch, self._empty_generation()
        capacity = self.completion_batch_size
        self._generation_batch = fresh
        self.completion_batch_size = capacity - len(held)  # the set-aside sequences keep their slots
        try:
            prompt_responses, _ = super().next()  # type: ignore[no-untyped-call]
        finally:
            self._generation_batch = held
            self.completion_batch_size = capacity
        first: list[Any] = []
        if len(fresh):
            me: Any = self
            with mx.stream(me._stream):  # as mlx-lm's next runs its steps
                first = fresh.next()  # their first tokens now (finished ones leave ``fresh``)
            if len(fresh):
                held.extend(fresh)
        return prompt_responses, first
