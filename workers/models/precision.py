"""The precision a model runs at: the ``dtype`` setting, resolved per device and applied at load.

``dtype`` is one of ``auto``, ``quantized``, ``float32``, ``bfloat16``, ``float16``:

- ``auto`` picks ``float32`` on a CPU device and ``quantized`` elsewhere. On Linux
  CPU, float32 matrix products go through the optimized BLAS, while MLX's quantized
  and half-precision CPU kernels do not: SmolLM2-135M decodes at about 14 tok/s in
  float32, 8 in Q4_1 and 6 in bfloat16 here. On Metal and CUDA, quantized is the
  fast choice.
- ``quantized`` keeps the weights as stored: a quantized model stays quantized and
  a float model stays as it is.
- A float type dequantizes quantized layers (mlx-lm's ``dequantize_model``, which
  uses ``mx.dequantize``) and casts every floating-point weight to it.

Imports MLX only inside its functions: a worker preloads its BLAS first.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from actors.config import DTYPES

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def on_cpu() -> bool:
    """Whether MLX computes on the CPU here (no Metal or CUDA device)."""
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.cpu


def resolve_dtype(dtype: str) -> str:
    """``auto`` made concrete for this device; any other value is returned checked."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return "float32" if on_cpu() else "quantized"
    return dtype


def apply_dtype(model: Any, dtype: str) -> Any:
    """The model at ``dtype`` (resolved): dequantized and cast for a float type, else unchanged."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    precision = resolve_dtype(dtype)
    if precision not in FLOAT_DTYPES:
        return model
    if quantized_bits(model):
        model = dequantize_model(model)
    model.set_dtype(getattr(mx, precision))
    mx.eval(model.parameters())
    return model


def quantized_bits(model: Any) -> list[int]:
    """The distinct bit widths of the model's quantized layers (empty when none is)."""
    return sorted({int(m.bits) for _, m in model.named_modules() if hasattr(m, "scales") and hasattr(m, "bits")})


def describe_precision(model: Any) -> str:
    """What the model computes in, for logs, ``ready`` and ``status``: ``float32`` or ``quantized 4/8-bit``."""
    from mlx.utils import tree_flatten

    bits = quantized_bits(model)
    if bits:
        return f"quantized {'/'.join(str(b) for b in bits)}-bit"
    by_dtype: Counter[str] = Counter()
    leaves = tree_flatten(model.parameters())  # (name, array) pairs: a list, as no destination is given
    for _, value in leaves if isinstance(leaves, list) else leaves.items():
        by_dtype[str(value.dtype).removeprefix("mlx.core.")] += value.nbytes
    return by_dtype.most_common(1)[0][0] if by_dtype else "unknown"


def load_model(path: str, dtype: str = "auto") -> tuple[Any, Any]:
    """Load a model folder (or hub id) through ``mlx_lm.load``, at ``dtype`` (see :func:`apply_dtype`)."""
    from mlx_lm import load

    loaded = load(path)  # (model, tokenizer); mlx-lm adds the config only when asked
    return apply_dtype(loaded[0], dtype), loaded[1]
