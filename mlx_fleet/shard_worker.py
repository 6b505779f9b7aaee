"""`mlx-fleet worker --shards N`: a sharded worker group joining a broker, on one machine or several.

Four ways to run one, all over MLX's ``ring`` backend (:mod:`actors.shard_group`):

- ``--shards N`` alone: the N ranks run here, on a fresh loopback ring.
- ``--shards N --hostfile hosts.json``: ``mlx.launch`` starts rank *i* on host *i* of the
  hostfile (ssh, or directly for ``127.0.0.1``), with the ring it derives from the
  hostfile's ips; this command reruns it when the group fails.
- ``--shards N --hostfile hosts.json --rank R``: this machine's rank only, on the same ring;
  each machine runs its own rank (by hand, or a service manager).
- under ``mlx.launch`` (``MLX_RANK`` and ``MLX_HOSTFILE`` set): this process is that rank.

The first three restart what they run when it exits (a rank that sees its group broken
exits, so the group re-forms), with the fleet's restart backoff; Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable

from actors.children import WORKER, ChildSpec, Children, RestartPolicy, WorkerSpec
from actors.clock import MonotonicClock
from actors.config import ConfigError, FleetConfig, check_shards, shard_bounds
from actors.proc import die_with_parent, spawn_child
from actors.shard_group import (
    ProcessGroup, Ring, ShardRank, local_ring, rank_from_env, read_launch_hostfile, ring_from_hosts,
)
from mlx_fleet.worker_entry import run_rank
from workers.worker import WorkerSettings

log = logging.getLogger("mlx_fleet.worker")

LOOP_S = 0.2  # how soon an exited rank is noticed


@dataclass(frozen=True)
class GroupPlan:
    """Which of the four ways runs the group (see the module doc), checked before anything starts."""

    bounds: dict[str, Any]
    from_env: ShardRank | None = None  # under mlx.launch: this process is that rank
    ring: Ring | None = None  # from the hostfile; None: a fresh loopback ring per start
    rank: int | None = None  # --rank: this machine's rank only
    launch: bool = False  # --hostfile without --rank: mlx.launch starts every rank


def plan_group(args: argparse.Namespace, cfg: FleetConfig) -> GroupPlan:
    """How to run ``--shards N`` with these flags; ConfigError naming the flag that cannot work."""
    check_shards(args.shards, args.shard_mode, "--shards/--shard-mode")
    if args.shards < 2:
        raise ConfigError("--hostfile and --rank are for a sharded group: add --shards N (N >= 2)")
    bounds = shard_bounds(cfg, args.shard_mode)
    try:
        from_env = rank_from_env(os.environ, **bounds)
        if from_env is not None:
            if from_env.size != args.shards:
                raise ConfigError(f"--shards {args.shards}, but mlx.launch started a group of {from_env.size}")
            return GroupPlan(bounds, from_env=from_env)
        if not args.hostfile:
            if args.rank is not None:
                raise ConfigError("--rank needs --hostfile (the hosts of every rank)")
            return GroupPlan(bounds)
        hosts = read_launch_hostfile(args.hostfile)
        ring = ring_from_hosts([ips for _, ips in hosts], starting_port=args.ring_port)
    except ValueError as exc:  # ConfigError is one too
        raise ConfigError(str(exc)) from None
    if len(hosts) != args.shards:
        raise ConfigError(f"--shards {args.shards}, but {args.hostfile} lists {len(hosts)} hosts (one per rank)")
    if args.rank is not None and not 0 <= args.rank < args.shards:
        raise ConfigError(f"--rank {args.rank}: expected 0..{args.shards - 1}")
    return GroupPlan(bounds, ring=ring, rank=args.rank, launch=args.rank is None)


def run_sharded_worker(plan: GroupPlan, args: argparse.Namespace, settings: WorkerSettings, cfg: FleetConfig) -> int:
    """Run the group (or this machine's part of it) as ``plan`` says, until stopped; the exit status."""
    if plan.from_env is not None:
        die_with_parent()
        run_rank(dataclasses.replace(settings, shard=plan.from_env))
        return 0
    if plan.launch:
        return launch_everywhere(args, settings, cfg)
    if plan.ring is not None and plan.rank is not None:
        ring, rank = plan.ring, plan.rank
        return supervise(settings, cfg, lambda: ranks_of(ring, [rank], plan.bounds))
    # All ranks here: they split this machine's memory and, through their BLAS threads, its cores.
    settings = dataclasses.replace(settings, memory_share=max(settings.memory_share, args.shards))
    return supervise(settings, cfg, lambda: ranks_of(local_ring(args.shards), range(args.shards), plan.bounds))


def ranks_of(ring: Ring, ranks: Any, bounds: dict[str, Any]) -> list[ShardRank]:
    """The ShardRanks of ``ranks`` on ``ring``."""
    return [ShardRank(r, ring, **bounds) for r in ranks]


def supervise(settings: WorkerSettings, cfg: FleetConfig, make_ranks: Callable[[], list[ShardRank]]) -> int:
    """Run the ranks ``make_ranks`` names as one restartable process until SIGINT/SIGTERM."""
    ring_dir = tempfile.mkdtemp(prefix="mlxf-ring-")  # the ranks' MLX_HOSTFILE files; removed at the end

    def launch(_: ChildSpec) -> ProcessGroup:
        ranks = make_ranks()
        procs = [spawn_child(f"{settings.worker_id}/rank{r.rank}", run_rank,
                             (dataclasses.replace(settings, shard=r), ring_dir)) for r in ranks]
        log.info("started rank(s) %s of %d: pids %s", ", ".join(str(r.rank) for r in ranks), ranks[0].size,
                 ", ".join(str(p.pid) for p in procs))
        return ProcessGroup(procs)

    children = Children(launch, MonotonicClock(), RestartPolicy.from_config(cfg))
    spec = ChildSpec(f"worker:{settings.worker_id}", WORKER,
                     WorkerSpec(settings.worker_id, settings.model, settings.source))
    child = children.add(spec)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    children.start_all()
    try:
        while not stop.wait(LOOP_S):
            children.check()
            if child.gave_up:
                log.error("the group keeps failing (restart_max=%d); giving up", cfg.restart_max)
                return 1
    finally:
        children.stop([child], cfg.drain_timeout_s + 10.0)
        shutil.rmtree(ring_dir, ignore_errors=True)
    return 0


def rank_argv(args: argparse.Namespace, worker_id: str) -> list[str]:
    """The `mlx-fleet worker` command each rank runs under mlx.launch (same flags, without the hostfile)."""
    argv = [sys.executable, "-m", "mlx_fleet", "worker", "--connect", args.connect, "--model", args.model,
            "--shards", str(args.shards), "--shard-mode", args.shard_mode, "--worker-id", worker_id]
    for flag, value in (("--metrics-events", args.metrics_events), ("--config", args.config), ("--blas", args.blas),
                        ("--dtype", args.dtype), ("--log-level", args.log_level),
                        ("--curve-secret", args.curve_secret), ("--curve-server-key", args.curve_server_key)):
        if value:
            argv += [flag, os.path.abspath(value) if flag in ("--config", "--curve-secret", "--curve-server-key")
                     else str(value)]
    return argv


def launch_everywhere(args: argparse.Namespace, settings: WorkerSettings, cfg: FleetConfig) -> int:
    """``mlx.launch`` the group on the hostfile's hosts; launch it again when it ends, until stopped."""
    launcher = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()",
                "--backend", "ring", "--hostfile", os.path.abspath(args.hostfile),
                "--starting-port", str(args.ring_port), "--cwd", os.getcwd(), "--",
                *rank_argv(args, settings.worker_id)]
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    policy = RestartPolicy.from_config(cfg)
    backoff_s = policy.backoff_s
    while not stop.is_set():
        # stdin is a pipe never written: mlx.launch forwards its stdin to every rank.
        proc = subprocess.Popen(launcher, stdin=subprocess.PIPE)
        while proc.poll() is None and not stop.wait(LOOP_S):
            pass
        if stop.is_set():
            proc.terminate()
            try:
                proc.wait(cfg.drain_timeout_s + 10.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
            break
        log.warning("mlx.launch ended with status %s; launching the group again in %.1fs", proc.returncode, backoff_s)
        stop.wait(backoff_s)
        backoff_s = min(backoff_s * 2, policy.backoff_max_s)
    return 0
