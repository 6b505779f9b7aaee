"""Decode attention on MLX's CPU backend: the query heads that share a KV head in one product.

mlx-lm's models call ``mlx_lm.models.base.scaled_dot_product_attention``, which calls
``mx.fast.scaled_dot_product_attention``. MLX has no fused kernel for it on the CPU; its
fallback gives every query head its own batch of matrix products (with grouped-query
attention the KV head is broadcast to each of its query heads), so a decode step of 32
sequences of SmolLM2 makes 288 products of one row each, per layer.

In a decode step (one query position per sequence) the query heads of a KV head can be the
rows of one product instead: the same dot products, softmax and weighted sum, in a third of
the calls on SmolLM2 (9 query heads, 3 KV heads). On this CPU that halves the attention and
takes 7% off a 32-sequence decode step with 100 tokens cached, 18% with 500
(benchmarks/results/decode_attention.md). The products are the same sums; BLAS may order a
row's sum differently when it is one of several rows, so outputs can differ from the
fallback's in the last bit (they are equal on SmolLM2, head size 64, and within 1e-6 at
head size 128).

:func:`install` puts :class:`GroupedDecodeAttention` in place of that function in the
modules of a loaded model's layers, when MLX computes on the CPU (on Metal and CUDA the
fused kernel is faster, and nothing changes). Everything else, prompt steps (more than one
query position), quantized KV caches, attention sinks, models without grouped KV heads,
goes to mlx-lm's function as before.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.models import base

ATTENTION_NAME = "scaled_dot_product_attention"  # the name mlx-lm's model modules import from .base


def grouped_decode_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                             mask: mx.array | str | None) -> mx.array | None:
    """Attention of one query position per sequence with each KV head's query heads as the rows of one
    product; None when the call is not that (more positions, no grouping, mixed dtypes, an unknown mask).

    ``queries`` is (batch, query heads, 1, head size), ``keys`` and ``values`` (batch, KV heads, keys, size);
    ``mask`` as ``mx.fast.scaled_dot_product_attention`` takes it (None, "causal", or an array that
    broadcasts to (batch, query heads, 1, keys), boolean or additive).
    """
    b, heads, positions, size = queries.shape
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    if positions != 1 or kv_heads >= heads or heads % kv_heads or not queries.dtype == keys.dtype == values.dtype:
        return None
    if isinstance(mask, str) and mask != "causal":
        return None
    group = heads // kv_heads
    q = (mx.array(scale, queries.dtype) * queries).reshape(b, kv_heads, group, size)
    scores = q @ keys.swapaxes(-1, -2)  # (batch, KV heads, group, keys)
    if isinstance(mask, mx.array):  # "causal" with one position lets every key through
        m = mx.broadcast_to(mask, (b, heads, 1, n_keys)).reshape(b, kv_heads, group, n_keys)
        if m.dtype == mx.bool_:
            scores = mx.where(m, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + m.astype(scores.dtype)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ values).reshape(b, heads, 1, values.shape[-1])


class GroupedDecodeAttention:
    """mlx-lm's attention function with decode steps done by :func:`grouped_decode_attention`."""

    def __init__(self, original: Callable[..., mx.array]) -> None:
        self.original = original

    def __call__(self, queries: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float,
                 mask: mx.array | str | None, sinks: mx.array | None = None) -> mx.array:
        if sinks is None and not hasattr(cache, "bits"):  # a quantized cache keeps mlx-lm's quantized path
            out = grouped_decode_attention(queries, keys, values, scale, mask)
            if out is not None:
                return out
        return self.original(queries, keys, values, cache, scale, mask, sinks)


def install(model: Any, device: mx.Device | None = None) -> list[str]:
    """On the CPU, use :class:`GroupedDecodeAttention` in every module that defines one of ``model``'s
    layers and calls mlx-lm's attention function; the modules changed (empty on another device, or
    when each already has it). The change is to those modules, so it holds for the whole process.
    """
    if (device or mx.default_device()).type != mx.DeviceType.cpu:
        return []
    changed = []
    for name in sorted({type(m).__module__ for _, m in model.named_modules()}):
        module = sys.modules.get(name)
        if module is not None and getattr(module, ATTENTION_NAME, None) is base.scaled_dot_product_attention:
            setattr(module, ATTENTION_NAME, GroupedDecodeAttention(base.scaled_dot_product_attention))
            changed.append(name)
    return changed
