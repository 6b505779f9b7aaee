"""How a worker process starts: its settings, built from the fleet's config in one place.

Kept apart from :mod:`fleet.wiring` so that a spawned worker imports only what
a worker needs (``spawn`` imports the module of the entry point it runs).
"""

from __future__ import annotations

from actors.children import WorkerSpec
from actors.config import BatchingConfig, FleetConfig
from actors.curve import local_secret_cert
from actors.metrics import events_addr
from actors.sockets import local_addr
from workers.worker import WorkerSettings, run_worker


def worker_settings(cfg: FleetConfig, *, worker_id: str, model: str, source: str, connect: str,
                    batching: BatchingConfig, metrics_events: str | None, curve_secret: str = "",
                    curve_server_public: str = "", dtype: str = "auto") -> WorkerSettings:
    """A worker's settings: who it is and where it connects, with the fleet's liveness, BLAS and logging."""
    return WorkerSettings(worker_id=worker_id, model=model, source=source, connect=connect, batching=batching,
                          dtype=dtype, heartbeat_interval_s=cfg.heartbeat_interval_s, heartbeat_liveness=cfg.heartbeat_liveness,
                          blas=cfg.blas, log_level=cfg.log_level, metrics_events=metrics_events,
                          curve_secret=curve_secret, curve_server_public=curve_server_public)


def local_worker_settings(spec: WorkerSpec, cfg: FleetConfig) -> WorkerSettings:
    """Settings of a worker the supervisor runs: the local backend, its metric events, the local CurveZMQ key."""
    secret = local_secret_cert(cfg)
    return worker_settings(cfg, worker_id=spec.worker_id, model=spec.model, source=spec.source,
                           connect=local_addr(cfg.backend), batching=spec.batching, dtype=spec.dtype,
                           metrics_events=events_addr(cfg.metrics_export, cfg.metrics_events),
                           curve_secret=secret, curve_server_public=cfg.curve_server_secret if secret else "")


def run_local_worker(spec: WorkerSpec, cfg: FleetConfig) -> None:
    """Process entry point of a worker child (spawned by the supervisor)."""
    run_worker(local_worker_settings(spec, cfg))
