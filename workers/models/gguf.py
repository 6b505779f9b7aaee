"""GGUF files as model sources: converted once into an MLX model folder, then loaded like any folder.

:func:`ensure_converted` hashes the file, and builds ``<cache>/gguf/<sha256[:16]>-<precision>-v<N>``
unless it is there. The conversion (:func:`convert_gguf`):

1. opens the file with llama.cpp's ``gguf`` package (:func:`workers.models.gguf_file.read_gguf`):
   a truncated or corrupt file fails here, naming the tensor;
2. maps its architecture onto an mlx-lm model class and config
   (:mod:`workers.models.gguf_arch`: llama and Mistral, qwen2, qwen3, gemma3, phi3), and each
   mlx-lm parameter onto its GGUF tensor with the ``gguf`` package's name map; an
   architecture, tensor or tokenizer it cannot serve correctly is refused by name;
3. reads the tensors one at a time (:mod:`workers.models.gguf_weights`): with ``mx.load``
   when the file holds only F32/F16/Q4_0/Q4_1/Q8_0 (kept quantized as they are),
   else dequantized with ``gguf.quants.dequantize``; undoes llama.cpp's changes (the
   Q/K row permutation of Llama files, the ``+1`` on Gemma's norms); and writes them
   at the precision asked for: a float type, or ``quantized`` (the file's own
   quantization, or ``mx.quantize`` after dequantizing);
4. writes ``model.safetensors``, ``config.json`` and the tokenizer files
   (:mod:`workers.models.gguf_tokenizer`).

The folder is built in a staging folder and renamed into place when complete
(:func:`workers.models.store.build_once`), so no half-converted model is ever served.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from actors.config import DTYPES
from workers.models.gguf_arch import SUPPORTED_ARCHITECTURES, arch_of, model_config, tensor_names
from workers.models.gguf_file import GGUFError, GGUFHeader, read_gguf
from workers.models.gguf_tokenizer import check_tokenizer, end_token_ids, tokenizer_files
from workers.models.gguf_weights import Plan, check_types, iter_weights, quantization_config
from workers.models.store import build_once, cache_dir, file_sha256, is_model_folder

log = logging.getLogger("mlx_fleet.gguf")

FORMAT_VERSION = 2  # bump when a converted folder's contents change for the same file and precision
PRECISIONS = tuple(d for d in DTYPES if d != "auto")  # what a conversion writes: a dtype made concrete
SHARD_BYTES = 2 << 30  # weights are written in files of about this size, so no more is held at once

__all__ = ["SUPPORTED_ARCHITECTURES", "GGUFError", "check_gguf", "convert_gguf", "ensure_converted",
           "find_converted", "converted_folder", "is_gguf_path"]

Progress = Callable[[str], None]


def is_gguf_path(source: str) -> bool:
    """Whether a SOURCE names a GGUF file (by its extension)."""
    return source.lower().endswith(".gguf")


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Errors raised inside name the file they are about."""
    try:
        yield
    except GGUFError as exc:
        if str(path) in str(exc):
            raise
        raise GGUFError(f"{path}: {exc}") from None


def check_gguf(header: GGUFHeader) -> dict[str, Any]:
    """Refuse, before dequantizing any tensor, what this converter cannot serve correctly.

    Returns the mlx-lm config the file maps to.
    """
    with naming(header.path):
        arch_of(header)
        check_types(header)
        check_tokenizer(header.metadata)
        config = model_config(header)
        tensor_names(header, config)
        return config


def _full_config(header: GGUFHeader, config: dict[str, Any], quantization: dict[str, Any] | None,
                 dtype_name: str) -> dict[str, Any]:
    """config.json: the architecture's config, the quantization, the tokens that end generation."""
    out = {**config, "torch_dtype": dtype_name, "eos_token_id": end_token_ids(header.metadata)}
    if (bos := header.metadata.get("tokenizer.ggml.bos_token_id")) is not None:
        out["bos_token_id"] = int(bos)
    if quantization:
        out["quantization"] = out["quantization_config"] = quantization
    out["mlx_fleet_gguf"] = {"format_version": FORMAT_VERSION, "source": header.path.name,
                             "file_type": header.metadata.get("general.file_type")}
    return out


def _write_weights(header: GGUFHeader, plan: Plan, folder: Path, say: Progress) -> None:
    """Write the weights in files of about :data:`SHARD_BYTES`, as they are read."""
    import mlx.core as mx

    shard: dict[str, Any] = {}
    held, index, written = 0, 0, 0

    def flush() -> None:
        nonlocal shard, held, index, written
        index += 1
        name = "model.safetensors" if index == 1 else f"model-{index:05d}.safetensors"
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        written += held
        shard, held = {}, 0

    for key, value in iter_weights(header, plan, say):
        shard[key] = value
        held += value.nbytes
        if held >= SHARD_BYTES:
            flush()
    if shard or index == 0:
        flush()
    say(f"wrote {plan.precision} weights ({written / 2**20:.0f} MiB in {index} file{'s' * (index > 1)})")


def convert_gguf(src: str | Path, folder: Path, precision: str, progress: Progress | None = None) -> None:
    """Write the MLX model folder for GGUF file ``src`` at ``precision`` into ``folder`` (which exists).

    Raises :class:`GGUFError` for a file this converter refuses; nothing is half-written
    in the cache because callers write into a staging folder (:func:`ensure_converted`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    say = progress or (lambda _text: None)
    header = read_gguf(src)
    config = check_gguf(header)
    with naming(header.path):
        files = tokenizer_files(header.metadata, model_max_length=int(config["max_position_embeddings"]))
        plan = Plan(arch_of(header), config, tensor_names(header, config), precision)
        _write_weights(header, plan, folder, say)
    dtype_name = "float16" if precision == "quantized" else precision
    full = _full_config(header, config, quantization_config(plan), dtype_name)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "config.json").write_text(json.dumps(full, indent=2) + "\n")
    generation = {"eos_token_id": full["eos_token_id"], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def converted_folder(sha256: str, precision: str, root: Path | None = None) -> Path:
    """Where the conversion of a file with this content hash at ``precision`` lives."""
    return (root if root is not None else cache_dir()) / "gguf" / f"{sha256[:16]}-{precision}-v{FORMAT_VERSION}"


def find_converted(sha256: str, precision: str, root: Path | None = None) -> Path | None:
    """The complete conversion of a file with this content hash at ``precision``, if the cache has it."""
    folder = converted_folder(sha256, precision, root)
    return folder if is_model_folder(folder) else None


def ensure_converted(src: str | Path, precision: str, *, root: Path | None = None,
                     progress: Progress | None = None) -> Path:
    """The MLX folder for GGUF file ``src`` at ``precision``, converting it first if needed.

    Keyed by the file's SHA-256, so a renamed copy reuses the folder and a changed
    file gets a new one (and is checked again: a file replaced by a broken one fails
    clearly instead of reusing an old conversion).
    """
    say = progress or (lambda text: log.info("%s", text))
    src = Path(src).expanduser()
    if not src.is_file():
        raise GGUFError(f"{src}: cannot read: no such file")
    t0 = time.monotonic()
    target = converted_folder(file_sha256(src), precision, root)
    if is_model_folder(target):
        return target

    def build(staged: Path) -> None:
        say(f"converting {src.name} to an MLX folder ({precision}) in {target}")
        convert_gguf(src, staged, precision, say)

    build_once(target, is_model_folder, build)
    say(f"{src.name} ready ({precision}) in {time.monotonic() - t0:.1f} s")
    return target
