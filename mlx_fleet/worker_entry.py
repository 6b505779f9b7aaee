"""How a worker process starts: its settings, built from the fleet's config in one place.

Kept apart from :mod:`mlx_fleet.wiring` so that a spawned worker imports only what
a worker needs (``spawn`` imports the module of the entry point it runs).
"""

from __future__ import annotations

import dataclasses
import os

from actors.children import WorkerSpec
from actors.config import BatchingConfig, FleetConfig
from actors.curve import local_secret_cert
from actors.metrics import events_addr
from actors.sockets import local_addr
from actors.shard_group import ShardRank, ring_env
from workers.worker import WorkerSettings, run_worker


def worker_settings(cfg: FleetConfig, *, worker_id: str, model: str, source: str, connect: str,
                    batching: BatchingConfig, metrics_events: str | None, curve_secret: str = "",
                    curve_server_public: str = "", dtype: str = "auto", chat_template: str = "",
                    tool_format: str = "") -> WorkerSettings:
    """A worker's settings: who it is and where it connects, with the fleet's liveness, BLAS and logging."""
    return WorkerSettings(worker_id=worker_id, model=model, source=source, connect=connect, batching=batching,
                          chat_template=chat_template, tool_format=tool_format,
                          dtype=dtype, heartbeat_interval_s=cfg.heartbeat_interval_s, heartbeat_liveness=cfg.heartbeat_liveness,
                          blas=cfg.blas, log_level=cfg.log_level, metrics_events=metrics_events,
                          curve_secret=curve_secret, curve_server_public=curve_server_public,
                          recovery_grace_s=cfg.recovery_grace_s, recovery_buffer_bytes=cfg.recovery_buffer_bytes)


def local_worker_settings(spec: WorkerSpec, cfg: FleetConfig) -> WorkerSettings:
    """Settings of a worker the supervisor runs: the local backend, its metric events, the local CurveZMQ key."""
    secret = local_secret_cert(cfg)
    settings = worker_settings(cfg, worker_id=spec.worker_id, model=spec.model, source=spec.source,
                               connect=local_addr(cfg.backend), batching=spec.batching, dtype=spec.dtype,
                               chat_template=spec.chat_template, tool_format=spec.tool_format,
                               metrics_events=events_addr(cfg.metrics_export, cfg.metrics_events),
                               curve_secret=secret, curve_server_public=cfg.curve_server_secret if secret else "")
    return dataclasses.replace(settings, memory_share=spec.memory_share)


def run_local_worker(spec: WorkerSpec, cfg: FleetConfig) -> None:
    """Process entry point of a worker child (spawned by the supervisor)."""
    run_worker(local_worker_settings(spec, cfg))


def run_rank(settings: WorkerSettings, ring_dir: str | None = None) -> None:
    """Run one rank of a sharded group in this process: rank 0 is the worker, the others follow.

    Sets the environment ``mlx.launch`` would (``MLX_RANK``, ``MLX_HOSTFILE``) first, unless this
    process already has it for the same rank; MLX reads it when the rank joins the ring.
    The ring's file goes to ``ring_dir`` (the system's temporary folder by default).
    """
    shard = settings.shard
    assert shard is not None
    if os.environ.get("MLX_RANK") != str(shard.rank) or not os.environ.get("MLX_HOSTFILE"):
        os.environ.update(ring_env(shard, ring_dir))
    if shard.rank == 0:
        run_worker(settings)
        return
    from workers.shard.follower import run_follower

    run_follower(settings)


def run_local_rank(spec: WorkerSpec, cfg: FleetConfig, shard: ShardRank) -> None:
    """Process entry point of one rank of a sharded worker group the supervisor runs (all ranks here)."""
    run_rank(dataclasses.replace(local_worker_settings(spec, cfg), shard=shard), cfg.runtime_dir or None)
