"""Helpers to run a real fleet (broker + spawned workers) inside a test."""

from __future__ import annotations

import dataclasses
import socket
import tempfile
from typing import Any

from actors.config import BatchingConfig, FleetConfig, ModelSpec
from actors.embedded import BackgroundFleet


def free_tcp_port() -> int:
    """A currently free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_ipc_dir() -> str:
    """A short /tmp folder for ipc:// sockets (paths are limited to ~100 bytes)."""
    return tempfile.mkdtemp(prefix="mlxf-", dir="/tmp")


# Kept under the name the tests use.
RunningFleet = BackgroundFleet


def make_config(
    *,
    transport: str = "ipc",
    models: tuple[tuple[str, str, int], ...] = (("demo", "demo", 1),),
    batching: BatchingConfig | None = None,
    gateway: bool = False,
    **overrides: Any,
) -> tuple[FleetConfig, str | None]:
    """A test FleetConfig on fresh ipc paths or tcp ports; metrics off unless asked.

    The HTTP gateway is off unless ``gateway=True``, which puts it on a free loopback port.
    """
    ipc_dir = None
    if transport == "ipc":
        ipc_dir = short_ipc_dir()
        frontend, backend = f"ipc://{ipc_dir}/front", f"ipc://{ipc_dir}/back"
    else:
        frontend, backend = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    b = batching or BatchingConfig()
    specs = tuple(ModelSpec(n, s, r, b) for n, s, r in models)
    base = FleetConfig(frontend=frontend, backend=backend, metrics_export=False, ready_timeout_s=120.0,
                       drain_timeout_s=10.0, models=specs, batching=b,
                       http_port=free_tcp_port() if gateway else 0)
    return dataclasses.replace(base, **overrides), ipc_dir


def start_fleet(**kwargs: Any) -> RunningFleet:
    """make_config + start."""
    cfg, ipc_dir = make_config(**kwargs)
    return RunningFleet(cfg, ipc_dir).start()
