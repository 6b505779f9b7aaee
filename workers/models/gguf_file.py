"""A GGUF file opened with llama.cpp's ``gguf`` package, with the checks a converter relies on.

:func:`read_gguf` reads the header with ``gguf.GGUFReader`` (every GGUF version, both
byte orders) and turns its failures into :class:`GGUFError` messages that name the
file and what is wrong: not a GGUF file, a truncated or corrupt header, a tensor of a
type the package does not know (named with its type id), or a tensor whose data runs
past the end of the file (a truncated download). The tensors' data stay memory-mapped:
nothing is read until a converter asks for one tensor (:attr:`TensorInfo.data`).

Why ``_get`` is overridden: gguf 0.19's reader slices its ``np.memmap`` once per array
element, and every such slice runs ``memmap.__array_finalize__``. A 262k-token
vocabulary (Gemma 3) then takes about a minute to open here; slicing a plain ndarray
view of the same mapping reads the same bytes about five times faster
(tests/integration/test_gguf_reader.py checks both give the same file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField


class GGUFError(ValueError):
    """A GGUF file that cannot be served; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor. ``dims`` are ggml's order (the fastest-moving first); ``data`` is its raw
    memory-mapped content (values for float and integer types, block bytes for quantized ones)."""

    name: str
    dims: tuple[int, ...]
    type_name: str
    n_bytes: int
    data: Any = field(repr=False, compare=False)

    @property
    def elements(self) -> int:
        """Number of values in the tensor."""
        return int(np.prod(self.dims))

    @property
    def qtype(self) -> GGMLQuantizationType:
        """The ggml type, as the ``gguf`` package names it."""
        return GGMLQuantizationType[self.type_name]


@dataclass
class GGUFHeader:
    """A GGUF file's metadata and tensor directory."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    file_bytes: int
    by_name: dict[str, TensorInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.tensors}


_KNOWN_TYPES = {int(t) for t in GGMLQuantizationType}


class _Reader(GGUFReader):
    """``GGUFReader`` reading through a plain ndarray view of its mapping (see the module doc),
    refusing unknown tensor types and out-of-file tensors by name."""

    _plain: Any = None

    def __init__(self, path: Path) -> None:
        self.path = path  # set first: errors raised while reading name it
        super().__init__(path)

    def _get(self, offset: int, dtype: Any, count: int = 1,
             override_order: None | Literal["I", "S", "<"] = None) -> Any:
        if self._plain is None:
            self._plain = self.data.view(np.ndarray)
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        arr = self._plain[offset:offset + itemsize * count].view(dtype)[:count]
        if len(arr) < count:
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF: {count} values at byte {offset} run past "
                            f"the end of the file ({len(self._plain)} bytes)")
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        size = len(self.data)
        for f in fields:
            _len, name_data, _n_dims, dims, raw_type, offset = f.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            type_id = int(raw_type[0])
            if type_id not in _KNOWN_TYPES:
                raise GGUFError(f"{self.path}: tensor {name!r} has type id {type_id}, which the gguf package "
                                f"does not know (an unknown ggml type)")
            qtype = GGMLQuantizationType(type_id)
            block, type_bytes = GGML_QUANT_SIZES[qtype]
            elements = int(np.prod(dims.astype(np.uint64)))
            if int(dims[0]) % block:
                raise GGUFError(f"{self.path}: tensor {name!r} ({qtype.name}) has rows of {int(dims[0])} values, "
                                f"not a multiple of its block size {block}")
            end = start_offs + int(offset[0]) + elements // block * type_bytes
            if end > size:
                raise GGUFError(f"{self.path}: truncated or corrupt GGUF: tensor {name!r} ends at byte {end}, "
                                f"the file has {size} bytes")
        super()._build_tensors(start_offs, fields)


def read_gguf(path: str | os.PathLike[str]) -> GGUFHeader:
    """Open and check a GGUF file; raise :class:`GGUFError` naming the file and what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 24:
            raise GGUFError(f"{path}: not a GGUF file ({size} bytes)")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, want b'GGUF')")
        reader = _Reader(path)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except GGUFError:
        raise
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise GGUFError(f"{path}: truncated or corrupt GGUF header: {exc}") from None
    metadata = {key: _value(f) for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = [TensorInfo(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes), t.data)
               for t in reader.tensors]
    version = int(reader.fields["GGUF.version"].parts[0][0])
    return GGUFHeader(path, version, metadata, tensors, size)


def _value(f: ReaderField) -> Any:
    """A metadata value as Python: str, int, float, bool, or a list of them."""
    if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.types) > 1 and f.types[-1] != GGUFValueType.STRING:
        if not f.data:
            return []
        return np.concatenate([f.parts[i] for i in f.data]).tolist()  # one concatenation, not one call per value
    return f.contents()
