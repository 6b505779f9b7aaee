"""Helpers to run a real fleet (broker + spawned workers) inside a test."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import tempfile
import threading
from typing import Any

from actors.config import BatchingConfig, FleetConfig, ModelSpec
from actors.supervisor import Supervisor


def free_tcp_port() -> int:
    """A currently free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_ipc_dir() -> str:
    """A short /tmp folder for ipc:// sockets (paths are limited to ~100 bytes)."""
    return tempfile.mkdtemp(prefix="mlxf-", dir="/tmp")


class RunningFleet:
    """A supervisor and its children; ``stop()`` drains and joins everything."""

    def __init__(self, cfg: FleetConfig, ipc_dir: str | None = None) -> None:
        self.cfg = cfg
        self.ipc_dir = ipc_dir
        self.sup = Supervisor(cfg)
        self._thread: threading.Thread | None = None

    def start(self) -> "RunningFleet":
        """Spawn and wait for ready; then watch children in a thread (restarts)."""
        try:
            self.sup.start()
        except BaseException:
            self.sup.shutdown()
            raise
        self._thread = threading.Thread(target=self.sup.run, daemon=True)
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

    def __enter__(self) -> "RunningFleet":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def child(self, name: str) -> Any:
        """The Child record named ``name`` (e.g. 'worker:demo-0')."""
        return next(c for c in self.sup.children if c.name == name)


def make_config(
    *,
    transport: str = "ipc",
    models: tuple[tuple[str, str, int], ...] = (("demo", "demo", 1),),
    batching: BatchingConfig | None = None,
    **overrides: Any,
) -> tuple[FleetConfig, str | None]:
    """A test FleetConfig on fresh ipc paths or tcp ports; metrics off unless asked."""
    ipc_dir = None
    if transport == "ipc":
        ipc_dir = short_ipc_dir()
        frontend, backend = f"ipc://{ipc_dir}/front", f"ipc://{ipc_dir}/back"
    else:
        frontend, backend = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    b = batching or BatchingConfig()
    specs = tuple(ModelSpec(n, s, r, b) for n, s, r in models)
    base = FleetConfig(frontend=frontend, backend=backend, metrics_export=False, ready_timeout_s=120.0,
                       drain_timeout_s=10.0, models=specs, batching=b)
    return dataclasses.replace(base, **overrides), ipc_dir


def start_fleet(**kwargs: Any) -> RunningFleet:
    """make_config + start."""
    cfg, ipc_dir = make_config(**kwargs)
    return RunningFleet(cfg, ipc_dir).start()
