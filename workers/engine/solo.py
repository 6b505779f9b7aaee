"""The engine's solo fast path: one sequence decoded by mlx-lm's own ``generate_step``.

Private to :mod:`workers.engine.adapter`, the only module that uses it; like the engine it
imports mlx, and every call must come from the one thread that owns MLX.

A lone request on an idle engine pays ``BatchGenerator``'s bookkeeping (batched caches,
per-step filtering, a response object per token) for nothing. :class:`Solo` decodes it
the way in-process mlx-lm does instead: one ``next()`` of ``generate_step`` per engine
step, over a KV cache the engine owns (fresh from ``make_prompt_cache``, or the prompt
cache's private copy of a cached prefix), with the request's own sampler.

When another request arrives, the solo sequence moves into the ``BatchGenerator``
(:meth:`Solo.handoff`). ``generate_step`` is pipelined: when it yields token ``y_n`` it
has already fed ``y_n`` to the model (the cache holds prompt + ``y_0..y_n``) and sampled
``y_{n+1}``, which is still in flight and never exposed. The handoff therefore drops that
in-flight step: it trims ``y_n`` off the cache and hands ``y_n`` over as a one-token
prompt, with ``all_tokens`` = prompt + ``y_0..y_{n-1}`` (what the trimmed cache holds).
``BatchGenerator`` feeds ``y_n`` and samples ``y_{n+1}`` again, from the same logits, and
its first response is ``y_{n+1}``: the stream goes on without a gap or a repeat. Its own
token count starts at that response, so it gets ``max_tokens - (n + 1)``. A seeded
sampler is rewound by one draw, so ``y_{n+1}`` is drawn with the same key both ways.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Callable, cast

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import KVCache, make_prompt_cache, trim_prompt_cache

from workers.engine.batch import controlled_sample
from workers.engine.controls import Rows


class Solo:
    """One request decoded by ``generate_step``; the engine holds its cache throughout.

    ``cache``/``cached_tokens``: a prompt-cache copy holding the first ``cached_tokens``
    of ``prompt_tokens`` (None, 0 on a miss).
    """

    def __init__(
        self,
        model: Any,
        prompt_tokens: list[int],
        *,
        max_tokens: int,
        sampler: Callable[[mx.array], mx.array],
        cache: list[Any] | None = None,
        cached_tokens: int = 0,
        prefill_step_size: int = 512,
        rows: Rows | None = None,
        uid: int = -1,
    ) -> None:
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.given_cache = cache  # handed back untouched if the generator never ran
        self.cache = cache if cache is not None else make_prompt_cache(model)
        self.tokens: list[int] = list(prompt_tokens)  # what the cache holds once stepped
        self.generated = 0
        prompt = mx.array(prompt_tokens[cached_tokens:])
        self._gen: Generator[tuple[Any, Any], None, None]
        if rows is not None and uid in rows.rows:  # a request with decoding controls
            self._gen = controlled_step(prompt, model, self.cache, sampler, rows, uid, prefill_step_size)
        else:
            self._gen = generate_step(prompt, model, max_tokens=max_tokens, sampler=sampler, prompt_cache=self.cache,
                                      prefill_step_size=prefill_step_size)

    def next(self) -> int:
        """The next token (the first call prefills). The cache then holds it too."""
        out, _ = next(self._gen)
        token = int(out)  # generate_step yields ints, annotated as mx.array; int() takes either
        self.tokens.append(token)
        self.generated += 1
        return token

    def finished_cache(self) -> tuple[list[Any], list[int]]:
        """Stop decoding; the cache (cut to what it holds) and the tokens it holds, to store."""
        self.close()
        for c in self.cache:
            if isinstance(c, KVCache) and c.keys is not None and c.values is not None and c.keys.shape[2] > c.offset:
                # KVCache grows in steps of 256 tokens; store only what is held, as BatchGenerator does.
                c.keys = mx.contiguous(c.keys[..., : c.offset, :])
                c.values = mx.contiguous(c.values[..., : c.offset, :])
        return self.cache, self.tokens

    def handoff(self) -> tuple[list[int], list[Any] | None, list[int], int]:
        """Stop decoding; ``(prompt, cache, all_tokens, max_tokens)`` for ``BatchGenerator.insert``.

        Before the first token nothing has run: the request goes over as inserted. After
        ``y_0..y_n``: the cache loses ``y_n``, which becomes the prompt (see the module doc).
        """
        self.close()
        if not self.generated:
            return self.prompt_tokens[self.cached_tokens:], self.given_cache, self.prompt_tokens[: self.cached_tokens], self.max_tokens
        if trim_kv(self.cache, 1) != 1:
            raise RuntimeError("solo cache could not be trimmed for the handoff")
        rewind = getattr(self.sampler, "rewind", None)
        if rewind is not None:
            rewind()  # the dropped in-flight step drew y_{n+1} already
        return [self.tokens[-1]], self.cache, self.tokens[:-1], self.max_tokens - self.generated

    def close(self) -> None:
        """End the generator (its in-flight step is dropped)."""
        self._gen.close()


def controlled_step(prompt: mx.array, model: Any, cache: list[Any], sampler: Callable[[mx.array], mx.array],
                    rows: Rows, uid: int, prefill_step_size: int) -> Generator[tuple[int, Any], None, None]:
    """``generate_step`` with the decoding controls of ``rows[uid]``: the same prefill and one-step overlap.

    Yields ``(token, None)``: the engine reads logprobs from the row.
    """
    with mx.stream(generation_stream):
        while len(prompt) > 1:
            n = min(prefill_step_size, len(prompt) - 1)
            model(prompt[:n][None], cache=cache)
            mx.eval([c.state for c in cache])
            prompt = prompt[n:]
            mx.clear_cache()

        def step(inputs: mx.array) -> mx.array:
            raw = model(inputs[None], cache=cache)[:, -1, :]
            plan = rows.plan([uid])
            assert plan is not None
            sampled, _, _, extra = controlled_sample(plan, rows, raw, inputs[-1:], sampler)
            mx.async_eval(sampled, extra)
            return sampled

        y = step(prompt)
        while True:
            next_y = step(y)  # in flight before this token is waited for
            mx.eval(y)
            rows.read_logprobs()
            yield cast(int, y.item()), None
            y = next_y
def trim_kv(cache: list[Any], num_tokens: int) -> int:
    """Trim ``cache`` in place by up to ``num_tokens``; how many tokens it trimmed."""
    # mlx-lm 0.32.2 returns that count but annotates trim_prompt_cache as returning List[Any].
    return trim_prompt_cache(cache, num_tokens)  # type: ignore[return-value]


def can_go_solo(model: Any) -> bool:
    """Whether ``model``'s cache can be trimmed by one token, as a handoff needs."""
    return all(c.is_trimmable() for c in make_prompt_cache(model))
