"""Decode attention grouped by KV head on the CPU (workers/engine/attention.py), against MLX's own.

Real MLX: the grouped form gives ``mx.fast.scaled_dot_product_attention``'s outputs for the
shapes, masks and dtypes models pass it, refuses what it does not cover, and a model with it
installed decodes the same tokens as with mlx-lm's function. (tests/conftest.py takes it out of
mlx-lm's modules again after every test.)
"""

from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models import base

from tests.integration.reference import batch_generator_tokens, mlx_lm_attention
from workers.engine import attention
from workers.engine.attention import GroupedDecodeAttention, grouped_decode_attention

pytestmark = pytest.mark.integration

SHAPES = [(9, 3, 64), (8, 2, 128), (4, 1, 32)]  # (query heads, KV heads, head size): SmolLM2, Llama-3-like, one KV head
TOLERANCE = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 2e-2}


def inputs(heads: int, kv_heads: int, size: int, dtype: mx.Dtype = mx.float32, batch: int = 5,
           n_keys: int = 37, positions: int = 1) -> tuple[mx.array, mx.array, mx.array]:
    key = mx.random.key(heads * 1000 + size)
    k1, k2, k3 = mx.random.split(key, 3)
    q = mx.random.normal((batch, heads, positions, size), key=k1).astype(dtype)
    k = mx.random.normal((batch, kv_heads, n_keys, size), key=k2).astype(dtype)
    v = mx.random.normal((batch, kv_heads, n_keys, size), key=k3).astype(dtype)
    return q, k, v


def masks(batch: int, heads: int, n_keys: int) -> dict[str, Any]:
    """The masks models pass at one position: none, "causal", left padding per sequence, per head, additive."""
    pad = mx.arange(n_keys)[None, :] >= mx.array([0, 3, 7, 1, 12][:batch])[:, None]
    per_head = mx.random.uniform(shape=(batch, heads, 1, n_keys), key=mx.random.key(7)) > 0.3
    per_head[..., -1] = True  # every row keeps a key
    return {"none": None, "causal": "causal", "padding": pad[:, None, None, :], "per_head": per_head,
            "additive": mx.where(pad, 0.0, -1e4)[:, None, None, :]}


@pytest.mark.parametrize("heads,kv_heads,size", SHAPES)
@pytest.mark.parametrize("mask_name", ["none", "causal", "padding", "per_head", "additive"])
def test_grouped_attention_gives_mlx_outputs(heads: int, kv_heads: int, size: int, mask_name: str) -> None:
    q, k, v = inputs(heads, kv_heads, size)
    mask = masks(q.shape[0], heads, k.shape[2])[mask_name]
    scale = size ** -0.5
    got = grouped_decode_attention(q, k, v, scale, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    assert got is not None and got.shape == want.shape and got.dtype == want.dtype
    assert mx.abs(got - want).max().item() <= TOLERANCE[mx.float32]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_grouped_attention_keeps_half_precision(dtype: mx.Dtype) -> None:
    q, k, v = inputs(8, 2, 64, dtype)
    mask = masks(q.shape[0], 8, k.shape[2])["padding"]
    got = grouped_decode_attention(q, k, v, 0.125, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert got is not None and got.dtype == dtype
    assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() <= TOLERANCE[dtype]


def test_value_size_and_mask_rank_as_models_pass_them() -> None:
    q, k, v = inputs(8, 2, 64)
    v = mx.random.normal((v.shape[0], 2, v.shape[2], 32), key=mx.random.key(3))  # value heads narrower than keys
    for mask in (mx.arange(k.shape[2]) >= 2, (mx.arange(k.shape[2]) >= 4)[None, :]):  # rank 1 and 2, as rotating caches give
        got = grouped_decode_attention(q, k, v, 0.125, mask)
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        assert got is not None and got.shape == want.shape == (q.shape[0], 8, 1, 32)
        assert mx.abs(got - want).max().item() <= TOLERANCE[mx.float32]


def test_grouped_attention_leaves_other_calls_to_mlx() -> None:
    q, k, v = inputs(8, 2, 64, positions=3)
    assert grouped_decode_attention(q, k, v, 0.125, "causal") is None  # a prompt step
    q, k, v = inputs(4, 4, 64)
    assert grouped_decode_attention(q, k, v, 0.125, None) is None  # no grouping: MLX's form is this one
    q, k, v = inputs(8, 2, 64)
    assert grouped_decode_attention(q, k.astype(mx.float16), v, 0.125, None) is None  # mixed dtypes


class Recording:
    """Stands for mlx-lm's function: records that it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any) -> mx.array:
        self.calls += 1
        return mx.zeros((1,))


def test_sinks_and_quantized_caches_keep_mlx_lms_path() -> None:
    original = Recording()
    wrapped = GroupedDecodeAttention(original)
    q, k, v = inputs(8, 2, 64)

    class QuantizedCache:
        bits = 4

    wrapped(q, k, v, QuantizedCache(), 0.125, None)
    wrapped(q, k, v, None, 0.125, None, mx.zeros((8,)))
    assert original.calls == 2
    out = wrapped(q, k, v, None, 0.125, None)
    assert original.calls == 2 and out.shape == q.shape


ON_CPU = pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu,
                            reason="installs only where MLX computes on the CPU")


@pytest.fixture
def plain_module(demo_small_loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The module of demo-small's model class, with mlx-lm's own attention function in it for the test."""
    module = sys.modules[type(demo_small_loaded[0]).__module__]
    monkeypatch.setattr(module, attention.ATTENTION_NAME, base.scaled_dot_product_attention)
    return module


@ON_CPU
def test_install_changes_the_models_modules_once(demo_small_loaded: tuple[Any, Any], plain_module: Any) -> None:
    model, module = demo_small_loaded[0], plain_module
    assert attention.install(model, mx.Device(mx.DeviceType.gpu)) == []  # Metal and CUDA keep the fused kernel
    assert attention.install(model) == [module.__name__]
    assert isinstance(getattr(module, attention.ATTENTION_NAME), GroupedDecodeAttention)
    assert attention.install(model) == []


def decode(model: Any, tokenizer: Any) -> list[list[int]]:
    """Greedy tokens of four prompts of different lengths (so the batch is left-padded), 24 each."""
    prompts = [tokenizer.encode("x " * n + "Tell me about the sea.") for n in (0, 5, 17, 40)]
    return batch_generator_tokens(model, prompts, 24, [[-1]], completion_batch_size=8, prefill_batch_size=8)


@ON_CPU
def test_a_model_decodes_the_same_tokens_with_it(demo_small_loaded: tuple[Any, Any], plain_module: Any) -> None:
    model, tokenizer = demo_small_loaded
    module = plain_module
    plain = decode(model, tokenizer)
    assert attention.install(model) == [module.__name__]
    grouped = decode(model, tokenizer)
    assert all(len(t) == 24 for t in grouped)
    assert grouped == plain


@ON_CPU
def test_the_in_process_reference_runs_mlx_lms_own_attention(demo_small_loaded: tuple[Any, Any]) -> None:
    """After a make_engine in this process, tests/integration/reference.py still compares with mlx-lm's own path."""
    from actors.config import BatchingConfig
    from workers.engine.adapter import make_engine

    model, tokenizer = demo_small_loaded
    module = sys.modules[type(model).__module__]
    make_engine(model, tokenizer, BatchingConfig(decode_capacity=4)).close()
    assert isinstance(getattr(module, attention.ATTENTION_NAME), GroupedDecodeAttention)
    with mlx_lm_attention():
        assert getattr(module, attention.ATTENTION_NAME) is base.scaled_dot_product_attention
    assert isinstance(getattr(module, attention.ATTENTION_NAME), GroupedDecodeAttention)
