"""Logging set-up shared by every process: one line per record, tagged by actor."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "INFO", actor: str = "fleet") -> None:
    """Log to stderr as ``time actor[pid] LEVEL message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {actor}[{os.getpid()}] %(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
