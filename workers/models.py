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
