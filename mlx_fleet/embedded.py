"""Run a whole fleet inside another program (tests, benchmarks, notebooks).

``BackgroundFleet`` starts a supervisor, waits for every replica, and watches
its children from a background thread, so restarts work as under `mlx-fleet up`.
"""

from __future__ import annotations

import shutil
import threading
from typing import Any

from actors.children import Child
from actors.config import FleetConfig
from mlx_fleet.wiring import make_supervisor


class BackgroundFleet:
    """A supervisor and its children; ``stop()`` drains and joins everything."""

    def __init__(self, cfg: FleetConfig, ipc_dir: str | None = None) -> None:
        self.cfg = cfg
        self.ipc_dir = ipc_dir  # removed on stop
        self.sup = make_supervisor(cfg)
        self._thread: threading.Thread | None = None

    def start(self) -> "BackgroundFleet":
        """Spawn and wait for ready; then watch children in a thread (restarts)."""
        try:
            self.sup.start()
        except BaseException:
            self.sup.shutdown()
            raise
        self._thread = threading.Thread(target=self.sup.run, name="fleet-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Drain and stop every child."""
        self.sup.request_stop()
        if self._thread is not None:
            self._thread.join(10)
        self.sup.shutdown()
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def __enter__(self) -> "BackgroundFleet":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def child(self, name: str) -> Child:
        """The supervised child named ``name`` (e.g. 'worker:demo-0')."""
        return self.sup.children[name]
