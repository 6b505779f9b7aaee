"""Where a model SOURCE points: the built-in demo, a local folder, or a hub id."""

from __future__ import annotations

from pathlib import Path


def resolve_source(source: str) -> Path | str:
    """A local path for the demo names and folders; a hub id is returned as is.

    Raises FileNotFoundError for a path-like SOURCE that does not exist, so a
    typo fails fast instead of trying the hub.
    """
    from workers.demo_model import resolve_demo_source

    demo = resolve_demo_source(source)
    if demo is not None:
        return demo
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"model source {source!r} is neither a folder nor a hub id (owner/name)")
    return source


def check_source(source: str) -> None:
    """Fail fast, without building or downloading anything, on a SOURCE no worker could load.

    Raises FileNotFoundError for a path-like SOURCE that does not exist.
    """
    from workers.demo_model import is_demo_source

    if is_demo_source(source):
        return
    path = Path(source).expanduser()
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise FileNotFoundError(f"model source {source!r} is neither a folder nor a hub id (owner/name)")


def weights_bytes(source: str) -> int | None:
    """Bytes of the ``*.safetensors`` files of a model SOURCE on disk; None when it is not on disk.

    The estimate of what one replica holds in memory. A hub id counts when it is
    in the local Hugging Face cache; nothing is downloaded.
    """
    try:
        found = resolve_source(source)
    except (FileNotFoundError, ValueError):
        return None
    folder = found if isinstance(found, Path) else _cached_hub_folder(found)
    if folder is None:
        return None
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _cached_hub_folder(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, no huggingface_hub, or a bad id: unknown size
        return None
