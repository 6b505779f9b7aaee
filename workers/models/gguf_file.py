"""A GGUF file's header, read in pure Python: metadata, tensor directory, bounds checks.

GGUF (llama.cpp's model format) is a little-endian file: the magic ``GGUF``, a
version, the tensor and metadata counts, the metadata as typed key/value pairs, one
directory entry per tensor (name, dimensions, ggml type, offset), then the tensor
data, aligned to ``general.alignment`` (32 by default).

:func:`read_gguf` checks everything a converter relies on before any tensor is
read: the magic and version, every length against the file's size, and that every
tensor's data lies inside the file (a truncated download fails here, naming the
tensor). It imports no MLX; the conversion (:mod:`workers.models.gguf`) reads the tensors
with ``mx.load`` after this check.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4


class GGUFError(ValueError):
    """A GGUF file that cannot be served; the message names the file and what is wrong."""


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: elements per block and bytes per block."""

    name: str
    block_size: int
    type_size: int


# ggml's type ids (ggml.h), with their block layout.
GGML_TYPES: dict[int, GGMLType] = {t_id: GGMLType(*spec) for t_id, spec in {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}.items()}

# Metadata value types: id -> struct format of one scalar (8: string, 9: array).
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's directory entry. ``dims`` are ggml's order: the fastest-moving first."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the data section

    @property
    def type_name(self) -> str:
        """ggml's name for the type (``Q4_1``), or ``type N`` for an id this reader does not know."""
        known = GGML_TYPES.get(self.type_id)
        return known.name if known else f"type {self.type_id}"

    @property
    def elements(self) -> int:
        """Number of values in the tensor."""
        n = 1
        for d in self.dims:
            n *= d
        return n

    def nbytes(self) -> int | None:
        """Bytes of the tensor's data; None for an unknown type."""
        t = GGML_TYPES.get(self.type_id)
        if t is None:
            return None
        return self.elements // t.block_size * t.type_size


@dataclass
class GGUFHeader:
    """Everything before a GGUF file's tensor data."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_bytes: int
    alignment: int = DEFAULT_ALIGNMENT
    by_name: dict[str, TensorInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.tensors}


class _Cursor:
    """Reads little-endian values from a buffer, failing clearly at its end."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.pos + nbytes > self.size:
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF: {what} runs past the end of the file "
                            f"(at byte {self.pos}, {nbytes} bytes wanted, file has {self.size})")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int, what: str) -> Any:
        if type_id in _SCALARS:
            return self.scalar(_SCALARS[type_id], what)
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY:
            elem = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if elem == _ARRAY:
                raise GGUFError(f"{self.path}: nested arrays in {what} are not supported")
            if elem in _SCALARS:  # one bulk unpack: token-type arrays hold ~10^5 values
                fmt = _SCALARS[elem]
                self.need(count * struct.calcsize(fmt), what)
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                self.pos += count * struct.calcsize(fmt)
                return values
            if elem == _STRING:
                self.need(count * 8, what)  # at least a length per string: a bad count fails before the loop
                return [self.string(what) for _ in range(count)]
            raise GGUFError(f"{self.path}: unknown array element type {elem} in {what}")
        raise GGUFError(f"{self.path}: unknown metadata value type {type_id} in {what}")


def read_gguf(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read and check a GGUF file's header; raise :class:`GGUFError` naming what is wrong.

    Checks the magic, the version, every length against the file size, and that each
    tensor's data (for the types this reader knows) lies inside the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{path}: not a GGUF file ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path), size)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _parse(cur: _Cursor, size: int) -> GGUFHeader:
    path = cur.path
    if bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {bytes(cur.buf[:4])!r}, want {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    if n_tensors > size // 24 or n_kv > size // 12:  # each entry takes at least that many bytes
        raise GGUFError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys in {size} bytes)")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        type_id = cur.scalar("<I", f"metadata {key!r}")
        metadata[key] = cur.value(type_id, f"metadata {key!r}")
    tensors = [_tensor_info(cur, i) for i in range(n_tensors)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: bad general.alignment {alignment!r}")
    data_offset = -(-cur.pos // alignment) * alignment
    header = GGUFHeader(path, version, metadata, tensors, data_offset, size, alignment)
    _check_extents(header)
    return header


def _tensor_info(cur: _Cursor, index: int) -> TensorInfo:
    name = cur.string(f"tensor #{index} name")
    n_dims = cur.scalar("<I", f"tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"{cur.path}: tensor {name!r} has {n_dims} dimensions")
    dims = tuple(cur.scalar("<Q", f"tensor {name!r} dims") for _ in range(n_dims))
    type_id = cur.scalar("<I", f"tensor {name!r} type")
    offset = cur.scalar("<Q", f"tensor {name!r} offset")
    return TensorInfo(name, dims, type_id, offset)


def _check_extents(header: GGUFHeader) -> None:
    for t in header.tensors:
        ggml = GGML_TYPES.get(t.type_id)
        if ggml is None:
            continue  # the converter refuses unknown types by name
        if t.elements % ggml.block_size:
            raise GGUFError(f"{header.path}: tensor {t.name!r} ({t.type_name}) has {t.elements} values, "
                            f"not a multiple of its block size {ggml.block_size}")
        end = header.data_offset + t.offset + (t.nbytes() or 0)
        if t.offset % header.alignment or end > header.file_bytes:
            raise GGUFError(f"{header.path}: truncated or corrupt GGUF: tensor {t.name!r} ends at byte {end}, "
                            f"the file has {header.file_bytes} bytes")
