"""A GGUF file's tensors as mlx-lm weights at a precision, read one tensor at a time.

Two readers, chosen per file:

- **native**: when every tensor is F32, F16, Q4_0, Q4_1 or Q8_0, ``mx.load`` reads
  the file and gives the quantized ones as MLX affine-quantized weights (``weight``,
  ``scales``, ``biases``, groups of 32), so ``quantized`` keeps the file's own values
  without a round trip. (``mx.load`` refuses a whole file if any tensor is of
  another type, which is why mixed files such as Q4_K_M take the other reader.)
- **dequantizing**: every other file. Each tensor is dequantized from the file's
  memory map with ``gguf.quants.dequantize`` (numpy, every K- and I-quant, BF16,
  Q5_0/Q5_1), fixed (:func:`workers.models.gguf_arch.fix_weight`) and converted before the
  next one is read, so memory holds the output and one tensor, never the whole file
  in float32.

Precision: a float type casts every tensor. ``quantized`` re-quantizes each tensor
the file stored quantized with ``mx.quantize`` (:data:`REQUANT_BITS`, groups of
:data:`REQUANT_GROUP_SIZE`); tensors stored as floats stay floats.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from workers.models.gguf_arch import Arch, fix_weight
from workers.models.gguf_file import GGUFError, GGUFHeader, TensorInfo

Progress = Callable[[str], None]

NATIVE_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")  # what mx.load reads (the quantized ones kept quantized)
FLOAT_TYPES = ("F32", "F16", "BF16")
# ``quantized`` on the dequantizing path: MLX's width for each ggml type. Group size 32
# matches ggml's 32-value (sub-)blocks, so a Q4_K sub-block, which is one scale and one
# minimum over 16 levels, re-quantizes onto nearly the same grid. Q5 types go to 4 bits
# (not MLX's 5) to stay near the file's size on MLX's most used kernels; Q6_K keeps 6
# bits; Q8_0 keeps 8. Types under 4 bits (Q2_K, Q3_K, the IQ2/IQ3/IQ1 and ternary
# types) take 4, MLX's smallest width with fast kernels on every backend.
REQUANT_GROUP_SIZE = 32
REQUANT_BITS = {"Q6_K": 6, "Q8_0": 8, "Q8_1": 8, "Q8_K": 8}
DEFAULT_REQUANT_BITS = 4
PROGRESS_STEP = 0.1  # report every 10% of the file's tensor bytes
CHUNK_VALUES = 1 << 22  # rows dequantized at once: gguf's numpy dequantizers take a few times their output


def requant_bits(type_name: str) -> int:
    """MLX bit width a quantized ggml type is re-quantized to."""
    return REQUANT_BITS.get(type_name, DEFAULT_REQUANT_BITS)


def is_native(header: GGUFHeader) -> bool:
    """Whether ``mx.load`` can read every tensor of the file."""
    return all(t.type_name in NATIVE_TYPES for t in header.tensors)


def check_types(header: GGUFHeader) -> None:
    """Refuse, naming file, tensor and type, a tensor ``gguf.quants`` cannot dequantize."""
    import gguf
    from gguf.quants import _type_traits  # the types the package implements dequantization for

    for t in header.tensors:
        qtype = gguf.GGMLQuantizationType[t.type_name]
        if t.type_name not in FLOAT_TYPES and qtype not in _type_traits:
            raise GGUFError(f"{header.path}: tensor {t.name!r} has type {t.type_name}, which the gguf package "
                            f"cannot dequantize (it dequantizes F32, F16, BF16, the Q4/Q5/Q8, K- and I-quants)")


@dataclass
class Plan:
    """What the converter writes: names, the fixes, the precision."""

    arch: Arch
    config: Mapping[str, Any]
    names: Mapping[str, tuple[str, tuple[int, ...]]]  # mlx-lm name -> (GGUF name, mlx-lm shape)
    precision: str
    quantization: dict[str, dict[str, int]] = field(default_factory=dict)  # mlx-lm module -> bits, group size


class _Meter:
    """Progress by bytes read: a line each :data:`PROGRESS_STEP` of the file."""

    def __init__(self, header: GGUFHeader, say: Progress, verb: str) -> None:
        self.total = sum(t.n_bytes for t in header.tensors) or 1
        self.done, self.next_at, self.say, self.verb = 0, PROGRESS_STEP, say, verb
        self.count, self.n, self.t0 = 0, len(header.tensors), time.monotonic()

    def add(self, t: TensorInfo) -> None:
        self.done += t.n_bytes
        self.count += 1
        if self.done / self.total >= self.next_at or self.count == self.n:
            self.say(f"{self.verb}: {100 * self.done / self.total:.0f}% ({self.count}/{self.n} tensors, "
                     f"{self.done / 2**20:.0f}/{self.total / 2**20:.0f} MiB) in {time.monotonic() - self.t0:.1f} s")
            while self.next_at <= self.done / self.total:
                self.next_at += PROGRESS_STEP


def iter_weights(header: GGUFHeader, plan: Plan, say: Progress) -> Iterator[tuple[str, Any]]:
    """(mlx-lm name, evaluated MLX array) for every weight, ``scales``/``biases`` of quantized ones included.

    Fills ``plan.quantization`` with each quantized module's bits and group size.
    """
    reader = _native if is_native(header) else _dequantizing
    yield from reader(header, plan, say)


def _native(header: GGUFHeader, plan: Plan, say: Progress) -> Iterator[tuple[str, Any]]:
    import mlx.core as mx

    say(f"reading {header.path.name} ({header.file_bytes / 2**20:.0f} MiB) with mx.load")
    raw = mx.load(str(header.path))
    if not isinstance(raw, dict):  # mx.load gives a name -> array map for every .gguf
        raise GGUFError(f"{header.path}: MLX did not load it as a map of tensors")
    meter = _Meter(header, say, "converting")
    dtype = None if plan.precision == "quantized" else getattr(mx, plan.precision)
    for name, (gguf_name, shape) in plan.names.items():
        t = header.by_name[gguf_name]
        base, module = gguf_name.rpartition(".")[0], name.rpartition(".")[0]
        if gguf_name.endswith(".bias"):
            parts = {"bias": raw.pop(gguf_name)}
        else:
            parts = {k: raw.pop(f"{base}.{k}") for k in ("weight", "scales", "biases") if f"{base}.{k}" in raw}
        if "scales" in parts:
            group_size = t.dims[0] // parts["scales"].shape[-1]
            bits = parts["weight"].shape[-1] * 32 // t.dims[0]
            if dtype is None:
                plan.quantization[module] = {"group_size": group_size, "bits": bits}
            else:
                # float32 scales: the product is then exact, not rounded to the float16 scales' type
                parts = {"weight": mx.dequantize(parts["weight"], parts["scales"].astype(mx.float32),
                                                 parts["biases"].astype(mx.float32), group_size=group_size, bits=bits)}
        if dtype is not None:
            parts = {k: v.astype(dtype) for k, v in parts.items()}
        parts = {k: fix_weight(plan.arch, gguf_name, v, plan.config) for k, v in parts.items()}
        _check_shape(header, gguf_name, name, parts.get("weight", parts.get("bias")), shape, "scales" in parts)
        mx.eval(list(parts.values()))  # one tensor at a time: peak memory stays near the output's size
        for k, v in parts.items():
            yield f"{module}.{k}", v
        meter.add(t)


def _dequantizing(header: GGUFHeader, plan: Plan, say: Progress) -> Iterator[tuple[str, Any]]:
    import mlx.core as mx

    check_types(header)
    meter = _Meter(header, say, "dequantizing")
    for name, (gguf_name, shape) in plan.names.items():
        t = header.by_name[gguf_name]
        try:
            values = _dequantized(t)
        except (ValueError, NotImplementedError) as exc:
            raise GGUFError(f"{header.path}: tensor {t.name!r} ({t.type_name}) cannot be dequantized: {exc}") from None
        values = fix_weight(plan.arch, gguf_name, values, plan.config)
        _check_shape(header, gguf_name, name, values, shape, False)
        module, kind = name.rpartition(".")[0], name.rpartition(".")[2]
        w = mx.array(values)
        del values  # the MLX copy is all that is needed from here on
        for key, value in _at_precision(w, t, plan, module, kind).items():
            mx.eval(value)
            yield key, value
        del w
        meter.add(t)


def _dequantized(t: TensorInfo) -> Any:
    """The tensor as float32 numpy (mlx-lm's shape), dequantized :data:`CHUNK_VALUES` values at a time."""
    import numpy as np
    from gguf.quants import dequantize

    raw = np.asarray(t.data)
    rows = raw.reshape(-1, raw.shape[-1])  # a row: ``dims[0]`` values (or their blocks' bytes)
    out = np.empty((rows.shape[0], t.dims[0]), dtype=np.float32)
    step = max(1, CHUNK_VALUES // t.dims[0])
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = dequantize(rows[start:start + step], t.qtype).reshape(-1, t.dims[0])
    return out.reshape(t.dims[::-1])


def _at_precision(w: Any, t: TensorInfo, plan: Plan, module: str, kind: str) -> dict[str, Any]:
    import mlx.core as mx

    if plan.precision != "quantized":
        return {f"{module}.{kind}": w.astype(getattr(mx, plan.precision))}
    if t.type_name in FLOAT_TYPES or kind != "weight" or w.ndim != 2 or w.shape[-1] % REQUANT_GROUP_SIZE:
        source = {"F16": mx.float16, "BF16": mx.bfloat16}.get(t.type_name, mx.float32)
        return {f"{module}.{kind}": w.astype(source)}  # stored as floats: stays as stored
    bits = requant_bits(t.type_name)
    q, scales, biases = mx.quantize(w, group_size=REQUANT_GROUP_SIZE, bits=bits)
    plan.quantization[module] = {"group_size": REQUANT_GROUP_SIZE, "bits": bits}
    return {f"{module}.weight": q, f"{module}.scales": scales.astype(mx.float16), f"{module}.biases": biases.astype(mx.float16)}


def _check_shape(header: GGUFHeader, gguf_name: str, name: str, value: Any, want: tuple[int, ...], packed: bool) -> None:
    got = tuple(value.shape)
    if (got[:-1] if packed else got) != (want[:-1] if packed else want):
        raise GGUFError(f"{header.path}: tensor {gguf_name!r} has shape {got}, mlx-lm's {name} wants {want}")


def quantization_config(plan: Plan) -> dict[str, Any] | None:
    """The ``quantization`` entry of config.json: the most common (bits, group size) and the exceptions."""
    layers = plan.quantization
    if not layers:
        return None
    common = Counter((q["group_size"], q["bits"]) for q in layers.values()).most_common(1)[0][0]
    out: dict[str, Any] = {"group_size": common[0], "bits": common[1], "mode": "affine"}
    out.update({n: q for n, q in layers.items() if (q["group_size"], q["bits"]) != common})
    return out
