"""Every supported architecture and ggml type, on small random models written as GGUF files.

Each file is a random mlx-lm model written the way llama.cpp writes one
(tests/integration/gguf_synth.py). Converted by the fleet and loaded with mlx-lm, it must
give the logits of the model it was written from, within what the quantization costs.
The last tests leave out, one at a time, each fix llama.cpp's layout needs (the Q/K
permutation, Gemma's norm offset, its query scaling and sliding-window pattern,
Llama 3's rope frequencies), and show the same comparison then fails.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.gguf_synth import BLOCK_256, make_model, write_model_gguf
from tests.integration.ggufutil import demo_tokenizer_metadata
from workers.models import gguf_arch
from workers.models.gguf import convert_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]
IDS = [5, 17, 300, 42, 1000, 7, 7, 99, 512, 2000, 3, 64, 128, 256]
# Logits error allowed, relative to the largest logit, where the file decodes to exactly
# the model's weights: the float32 conversion is exact up to summation order.
FLOAT_TOL = 1e-4
# Where the file holds the model's weights quantized: the least cosine similarity of the
# logits with the original model's (measured here: 0.99999+, 0.99998, 0.9997, 0.98-0.99, 0.93-0.97).
QUANT_MIN_COSINE = {"F16": 0.99999, "BF16": 0.9999, "Q8_0": 0.999, "Q5_0": 0.97, "Q5_1": 0.97,
                    "Q4_0": 0.9, "Q4_1": 0.9}
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "IQ4_NL",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ3_S", "IQ1_S"]


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path) -> dict[str, Any]:
    """The demo model's byte-level BPE tokenizer as GGUF metadata (2048 tokens)."""
    return demo_tokenizer_metadata(demo_dir)


def logits(model: Any) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([IDS])).astype(mx.float32))[0]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def cosine(got: np.ndarray, want: np.ndarray) -> float:
    a, b = got.ravel().astype(np.float64), want.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def written(tmp_path: Path, tokenizer: dict[str, Any], name: str, kind: str, *,
            qk_scale: float = 8.0) -> tuple[Path, Any]:
    """(the GGUF file, the mlx-lm model holding exactly what it decodes to), and the original's logits."""
    vocab = len(tokenizer["tokenizer.ggml.tokens"])
    model, config = make_model(name, vocab, hidden=256 if kind in BLOCK_256 else 64, qk_scale=qk_scale)
    original = logits(model)
    path = write_model_gguf(tmp_path / f"{name}-{kind}.gguf", name, model, config, tokenizer, kind)
    return path, (model, original)


def converted(path: Path, out: Path, precision: str = "float32") -> Any:
    from mlx_lm import load

    out.mkdir()
    convert_gguf(path, out, precision)
    return load(str(out))[0]


def matrix() -> list[Any]:
    """Every architecture with every type. The default run takes a cross of it: every type on
    Llama, and every architecture with a K-quant (``Q4_K``); the rest is marked slow."""
    return [pytest.param(name, kind, marks=() if name == "llama" or kind == "Q4_K" else pytest.mark.slow)
            for name in ARCHS for kind in TYPES]


@pytest.mark.parametrize("name, kind", matrix())
def test_float32_logits_equal_the_written_model(tmp_path: Path, tokenizer: dict[str, Any], name: str, kind: str) -> None:
    path, (model, _) = written(tmp_path, tokenizer, name, kind)
    got = logits(converted(path, tmp_path / "out"))
    assert relative_error(got, logits(model)) < FLOAT_TOL


@pytest.mark.parametrize("kind", list(QUANT_MIN_COSINE))
@pytest.mark.parametrize("name", ["llama", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_quantizable_types_stay_near_the_original(tmp_path: Path, tokenizer: dict[str, Any], name: str, kind: str) -> None:
    """A type written by quantizing the model's own weights gives the original's logits within what it costs
    (soft attention here: sharp attention turns any rounding into large logit changes)."""
    path, (_, original) = written(tmp_path, tokenizer, name, kind, qk_scale=1.0)
    assert cosine(logits(converted(path, tmp_path / "out")), original) > QUANT_MIN_COSINE[kind]


@pytest.mark.parametrize("kind, bits", [("Q4_K", 4), ("Q5_K", 4), ("Q6_K", 6), ("Q5_0", 4), ("Q5_1", 4), ("IQ4_XS", 4)])
def test_quantized_requantizes_with_mlx(tmp_path: Path, tokenizer: dict[str, Any], kind: str, bits: int) -> None:
    """``quantized`` re-quantizes each dequantized tensor with mx.quantize at the documented width:
    the same logits as mlx's own quantization of the float32 conversion, layer by layer."""
    import mlx.nn as nn

    from workers.models.precision import describe_precision

    path, _ = written(tmp_path, tokenizer, "gemma3", kind)
    quantized = converted(path, tmp_path / "out", "quantized")
    layers = {name: m for name, m in quantized.named_modules() if hasattr(m, "scales")}
    assert (layers["model.layers.0.mlp.down_proj"].bits, layers["model.layers.0.mlp.down_proj"].group_size) == (bits, 32)
    assert describe_precision(quantized).startswith("quantized")
    dense = converted(path, tmp_path / "float32")
    nn.quantize(dense, class_predicate=lambda name, _m: {"group_size": 32, "bits": layers[name].bits}
                if name in layers else False)
    assert relative_error(logits(quantized), logits(dense)) < 1e-2  # only the float16 scales differ


def _sabotaged(monkeypatch: pytest.MonkeyPatch, arch: str, **changes: Any) -> None:
    spec = gguf_arch.ARCHITECTURES[arch]
    monkeypatch.setitem(gguf_arch.ARCHITECTURES, arch, dataclasses.replace(spec, **changes))


def _config_change(monkeypatch: pytest.MonkeyPatch, arch: str, **overrides: Any) -> None:
    spec = gguf_arch.ARCHITECTURES[arch]

    def config(h: gguf_arch.Hparams) -> dict[str, Any]:
        out = spec.config(h)
        out.update({k: v(out) for k, v in overrides.items()})
        return {k: v for k, v in out.items() if v is not None}

    monkeypatch.setitem(gguf_arch.ARCHITECTURES, arch, dataclasses.replace(spec, config=config))


LEFT_OUT = {
    "llama-permutation": ("llama", lambda mp: _sabotaged(mp, "llama", permute_qk=False)),
    "mistral-permutation": ("mistral", lambda mp: _sabotaged(mp, "llama", permute_qk=False)),
    "llama3-rope-freqs": ("llama3", lambda mp: _config_change(mp, "llama", rope_scaling=lambda c: None)),
    "gemma3-norm-offset": ("gemma3", lambda mp: _sabotaged(mp, "gemma3", norm_offset=0.0)),
    "gemma3-query-scaling": ("gemma3", lambda mp: _config_change(
        mp, "gemma3", query_pre_attn_scalar=lambda c: c["hidden_size"] // c["num_attention_heads"])),
    "gemma3-sliding-window": ("gemma3", lambda mp: _config_change(mp, "gemma3", sliding_window_pattern=lambda c: 1)),
    "gemma3-permuted-like-llama": ("gemma3", lambda mp: _sabotaged(mp, "gemma3", permute_qk=True)),
    "qwen3-permuted-like-llama": ("qwen3", lambda mp: _sabotaged(mp, "qwen3", permute_qk=True)),
}


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
@pytest.mark.parametrize("case", list(LEFT_OUT))
def test_each_fix_left_out_fails(tmp_path: Path, tokenizer: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                 case: str, kind: str) -> None:
    """The comparisons above can fail: without each fix the logits leave the tolerance by far."""
    name, sabotage = LEFT_OUT[case]
    path, (model, original) = written(tmp_path, tokenizer, name, kind)
    sabotage(monkeypatch)
    got = logits(converted(path, tmp_path / "out"))
    assert relative_error(got, logits(model)) > 100 * FLOAT_TOL
    assert cosine(got, logits(model)) < QUANT_MIN_COSINE.get(kind, 0.999)
