"""Running a real fleet (a supervisor, its broker and spawned workers) inside a test.

``make_config`` builds a test ``FleetConfig`` on fresh ``ipc://`` paths or loopback
ports; ``start_fleet`` and ``running_fleet`` start it as a ``BackgroundFleet``;
``fleet_status``, ``worker_row`` and ``workers_of`` read what its broker reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import tempfile
from typing import Any, Iterator

from actors.config import BatchingConfig, FleetConfig, ModelSpec
from mlx_fleet.client import Client
from mlx_fleet.embedded import BackgroundFleet

# Kept under the name the tests use.
RunningFleet = BackgroundFleet


def free_tcp_port() -> int:
    """A currently free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_ipc_dir() -> str:
    """A short /tmp folder for ipc:// sockets (paths are limited to ~100 bytes)."""
    return tempfile.mkdtemp(prefix="mlxf-", dir="/tmp")


def make_config(
    *,
    transport: str = "ipc",
    models: tuple[tuple[str, str, int], ...] = (("demo", "demo", 1),),
    batching: BatchingConfig | None = None,
    gateway: bool = False,
    **overrides: Any,
) -> tuple[FleetConfig, str | None]:
    """A test FleetConfig on fresh ipc paths or tcp ports, with `mlx-fleet up`'s defaults otherwise.

    As `up` runs by default, metrics export and the collector are on (its events and its
    HTTP port on fresh private addresses). ``models`` are (name, source, replicas). The HTTP
    gateway is off unless ``gateway=True``, which puts it on a free loopback port (tests
    that do not speak HTTP need no gateway process). Returns the config and the ipc folder
    (None on tcp), which the fleet removes when it stops.
    """
    ipc_dir = None
    if transport == "ipc":
        ipc_dir = short_ipc_dir()
        frontend, backend = f"ipc://{ipc_dir}/front", f"ipc://{ipc_dir}/back"
        events = f"ipc://{ipc_dir}/events"
    else:
        frontend, backend = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
        events = f"tcp://127.0.0.1:{free_tcp_port()}"
    b = batching or BatchingConfig()
    specs = tuple(ModelSpec(n, s, r, b) for n, s, r in models)
    base = FleetConfig(frontend=frontend, backend=backend, metrics_export=True, metrics_port=free_tcp_port(),
                       metrics_events=events, ready_timeout_s=120.0, drain_timeout_s=10.0, models=specs, batching=b,
                       http_port=free_tcp_port() if gateway else 0)
    return dataclasses.replace(base, **overrides), ipc_dir


def start_fleet(**kwargs: Any) -> RunningFleet:
    """``make_config(**kwargs)``, started; returns once every replica is ready."""
    cfg, ipc_dir = make_config(**kwargs)
    return RunningFleet(cfg, ipc_dir).start()


@contextlib.contextmanager
def running_fleet(**kwargs: Any) -> Iterator[RunningFleet]:
    """``start_fleet`` as a context manager that always stops the fleet."""
    fleet = start_fleet(**kwargs)
    try:
        yield fleet
    finally:
        fleet.stop()


def fleet_status(addr: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """One ``status`` call on a fresh client."""
    with Client(addr, timeout_s=timeout_s) as client:
        return client.status()


def worker_row(status: dict[str, Any], worker_id: str) -> dict[str, Any] | None:
    """The status entry of one worker, wherever its model is."""
    for model in status["models"].values():
        for row in model["workers"]:
            if row["worker_id"] == worker_id:
                return row
    return None


def workers_of(client: Client, model: str) -> dict[str, dict[str, Any]]:
    """The registered workers of ``model`` by id (an empty map when the model is not listed)."""
    rows = client.status(timeout_s=5)["models"].get(model, {}).get("workers", [])
    # `workers` also lists the supervisor's children that are not registered (starting, restarting, hung, gave_up).
    return {w["worker_id"]: w for w in rows if w["state"] in ("ready", "retiring")}
