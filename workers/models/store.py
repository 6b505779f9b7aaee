"""The model cache: where built and converted models live, and building each once.

``$MLX_FLEET_CACHE`` (default ``~/.cache/mlx-fleet``) holds ``models/`` (the demo
models), ``gguf/`` (GGUF files converted to MLX folders) and, unless
``$MLX_FLEET_DOWNLOADS`` points elsewhere, ``downloads/`` (fetched model files).

:func:`build_once` is the one way a folder gets into the cache: builders serialise
on an ``fcntl.flock`` lock file, each builds in a hidden staging folder, and the
folder is renamed into place only when complete. A reader never sees a half-built
model, and several workers starting at once build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

CACHE_ENV = "MLX_FLEET_CACHE"
DOWNLOADS_ENV = "MLX_FLEET_DOWNLOADS"
HASH_CHUNK_BYTES = 4 << 20


ProgressFn = Callable[[str], None]  # takes one line of progress (a download, a conversion) to show the user


def cache_dir() -> Path:
    """The mlx-fleet cache folder.

    ``$MLX_FLEET_CACHE`` if set, else ``$XDG_CACHE_HOME/mlx-fleet`` (when that is an
    absolute path), else ``~/.cache/mlx-fleet``.
    """
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "mlx-fleet"


def downloads_dir() -> Path:
    """Where fetched model files are kept: ``$MLX_FLEET_DOWNLOADS``, else ``<cache>/downloads``.

    Separate from the conversions, so a test session with a throw-away cache can
    still reuse a file fetched once.
    """
    if explicit := os.environ.get(DOWNLOADS_ENV):
        return Path(explicit).expanduser()
    return cache_dir() / "downloads"


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def install_dir(staged: Path, target: Path) -> None:
    """Move ``staged`` to ``target``, replacing whatever ``target`` holds."""
    try:
        os.rename(staged, target)  # atomic; also replaces an empty directory
        return
    except OSError:
        if not os.path.lexists(target):
            raise
    retired = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    os.rename(target, retired)
    os.rename(staged, target)
    remove_path(retired)


def staging_path(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` to build into."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def build_into(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(folder)`` on a fresh staging folder, then rename it to ``target`` (replacing it).

    ``target`` never shows a half-built folder; a build that raises leaves nothing behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_path(target)
    os.mkdir(staged)
    try:
        build(staged)
        install_dir(staged, target)
    except BaseException:
        remove_path(staged)
        raise
    return target


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a whole built model (what :func:`build_once` checks for our models)."""
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def build_once(target: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """Return ``target``, first running ``build(staging_folder)`` if it is not complete.

    Safe when several processes call it at once: they serialise on a lock file next
    to ``target``, and the folder appears only once ``build`` has returned. A build
    that raises leaves nothing behind; staging folders of builders that died are
    removed by the next builder.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "ab") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)  # released when the file closes
        if is_complete(target):  # another process built it meanwhile
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # live builders hold this lock
            remove_path(stale)
        build_into(target, build)
    return target


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's contents, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def json_file_bytes(obj: Any) -> bytes:
    """``obj`` as a model folder's JSON files are written: indented UTF-8 with a final newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
