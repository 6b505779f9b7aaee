"""The engine's KV caches: the prompt cache over them, and several completions of one prompt.

Private to :mod:`workers.engine.adapter`. :func:`make_kv_prompt_cache` is the worker's prompt
cache (:mod:`workers.engine.prompt_cache`) over mlx-lm KV caches.

``n`` > 1: the prompt is prefilled once, its cache copied. The prompt but its last token is prefilled into
one KV cache (from the prompt cache's copy of a cached prefix when there is one), in
chunks of ``prefill_step_size`` on mlx-lm's generation stream, as mlx-lm prefills; each
completion then starts from its own copy of that cache with the last token as a one-token
prompt, the way a prompt-cache hit starts. The prefill runs inside the engine step that
admits the request.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

from workers.engine.prompt_cache import PromptCache
from workers.engine.solo import trim_kv


def prefill_shared(model: Any, prompt_tokens: list[int], cache: list[Any] | None, cached_tokens: int,
                   prefill_step_size: int) -> list[Any]:
    """A cache holding ``prompt_tokens[:-1]`` (``cache`` holds the first ``cached_tokens`` of them already)."""
    kv = cache if cache is not None else make_prompt_cache(model)
    rest = prompt_tokens[cached_tokens:-1]
    with mx.stream(generation_stream):
        for start in range(0, len(rest), prefill_step_size):
            model(mx.array(rest[start:start + prefill_step_size])[None], cache=kv)
            mx.eval([c.state for c in kv])
    return kv


def fork(kv: list[Any], n: int) -> list[list[Any]]:
    """``n`` caches with the same content: ``n - 1`` copies and ``kv`` itself."""
    return [copy.deepcopy(kv) for _ in range(n - 1)] + [kv]


def _kv_nbytes(kv: list[Any]) -> int:
    return sum(c.nbytes for c in kv)


def _copy_kv_prefix(kv: list[Any], held_tokens: int, keep_tokens: int) -> list[Any]:
    """A deep copy of ``kv`` cut to its first ``keep_tokens``: the stored entry stays untouched."""
    out = copy.deepcopy(kv)
    if keep_tokens < held_tokens and trim_kv(out, held_tokens - keep_tokens) != held_tokens - keep_tokens:
        raise ValueError("prompt cache entry could not be trimmed")
    return out


def make_kv_prompt_cache(model: Any, *, max_entries: int, max_bytes: int) -> PromptCache[list[Any]]:
    """A prompt cache over mlx-lm KV caches of ``model`` (``max_entries`` or ``max_bytes`` 0: off)."""
    return PromptCache(max_entries=max_entries, max_bytes=max_bytes, size_of=_kv_nbytes,
                       copy_prefix=_copy_kv_prefix, can_trim=can_trim_prompt_cache)
