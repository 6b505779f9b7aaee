"""A sharded replica: N rank processes over MLX's ``ring`` backend that live and die as one.

A model too large for one process runs as a group of ranks, each holding a shard of
the weights (mlx-lm's ``sharded_load``). The ranks find each other the way
``mlx.launch --backend ring`` tells them to: every rank gets ``MLX_RANK=<i>`` and
``MLX_HOSTFILE=<a file holding one list of "ip:port" per rank>``, and
``mx.distributed.init(backend="ring")`` reads both. :class:`ShardRank` is that
environment for one rank, plus the group's bounds; :func:`local_ring` picks free
loopback ports for a group on one machine, and :func:`ring_from_hosts` derives the
ring from the hosts of an ``mlx.launch`` hostfile the way ``mlx.launch`` does
(``--starting-port``, one port more per host address).

:class:`ProcessGroup` is a group of rank processes seen as one process by the
supervisor's registry (:mod:`actors.children`): its pid is rank 0's (the worker the
broker sees), it is alive only while every rank is, and the first time it finds a
rank gone it kills the others, so the registry restarts the whole group at once.

No MLX here: the ranks import it, after this environment is set.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from actors.proc import Process

SHARD_MODES = ("auto", "tensor", "pipeline")  # auto: tensor where the model supports it, else pipeline
RING_STARTING_PORT = 32323  # mlx.launch's default --starting-port
GROUP_LOST_EXIT = 75  # a rank's exit status when its group broke (a peer died, hung or diverged)
MAX_SHARDS = 64

Ring = tuple[tuple[str, ...], ...]  # per rank, its "ip:port" addresses: the MLX_HOSTFILE content


@dataclass(frozen=True)
class ShardRank:
    """One rank of a group: its place, the ring's addresses, the shard mode and the group's bounds.

    ``op_timeout_s``: an engine operation (a step, an insert) running longer than this means the
    rank is hung, and it exits. ``start_timeout_s``: forming the group (the ring, the weights, the
    followers' hellos) taking longer than this fails the rank. ``beat_timeout_s``: rank 0 declares
    the group lost when a follower's beats stop for this long.
    """

    rank: int
    ring: Ring
    mode: str = "auto"
    op_timeout_s: float = 60.0
    start_timeout_s: float = 180.0
    beat_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if len(self.ring) < 2:
            raise ValueError("a sharded group needs at least 2 ranks")
        if not 0 <= self.rank < len(self.ring):
            raise ValueError(f"rank {self.rank} is outside a group of {len(self.ring)}")
        if self.mode not in SHARD_MODES:
            raise ValueError(f"shard_mode must be one of {', '.join(SHARD_MODES)}, got {self.mode!r}")
        if any(not addrs for addrs in self.ring):
            raise ValueError("every rank of the ring needs at least one ip:port")

    @property
    def size(self) -> int:
        """How many ranks the group has."""
        return len(self.ring)

    @property
    def rank0_host(self) -> str:
        """Rank 0's address on the ring: where the followers reach its op channel."""
        return split_addr(self.ring[0][0])[0]

    @property
    def own_host(self) -> str:
        """This rank's own address on the ring (its op channel binds or connects from here)."""
        return split_addr(self.ring[self.rank][0])[0]


def split_addr(addr: str) -> tuple[str, int]:
    """``"ip:port"`` to ``(ip, port)``; ValueError naming the address otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected ip:port, got {addr!r}")
    return host.strip("[]"), int(port)


def free_loopback_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_ring(size: int, *, free_port: Callable[[], int] = free_loopback_port) -> Ring:
    """A ring of ``size`` ranks on this machine: one free loopback port each."""
    if not 2 <= size <= MAX_SHARDS:
        raise ValueError(f"shards must be in 2..{MAX_SHARDS}")
    ports: list[int] = []
    while len(ports) < size:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return tuple((f"127.0.0.1:{p}",) for p in ports)


def ring_from_hosts(host_ips: Sequence[Sequence[str]], *, starting_port: int = RING_STARTING_PORT) -> Ring:
    """The ring ``mlx.launch --backend ring`` builds for these hosts' addresses (one connection per ip)."""
    if any(not ips for ips in host_ips):
        raise ValueError("the ring backend needs an ip for every host (the hostfile's \"ips\")")
    port = starting_port
    ring = []
    for ips in host_ips:
        addrs = []
        for ip in ips:
            addrs.append(f"{ip}:{port}")
            port += 1
        ring.append(tuple(addrs))
    return tuple(ring)


def read_launch_hostfile(path: str) -> list[tuple[str, list[str]]]:
    """The hosts of an ``mlx.launch`` hostfile: ``(ssh name, ips)`` per rank, in rank order.

    The file is a JSON list of ``{"ssh": NAME, "ips": [IP, ...]}``, or a map with that list
    under ``"hosts"`` (and ``"backend"``, ``"envs"``, which must not ask for another backend).
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"hostfile {path}: {exc}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("backend", "ring") not in ("", "ring"):
        raise ValueError(f"hostfile {path}: backend {data['backend']!r}; a sharded worker group runs on 'ring'")
    if not isinstance(hosts, list) or not hosts:
        raise ValueError(f"hostfile {path}: expected a list of hosts (or {{\"hosts\": [...]}})")
    out = []
    for i, host in enumerate(hosts):
        ips = host.get("ips") if isinstance(host, dict) else None
        if not isinstance(host, dict) or not isinstance(host.get("ssh"), str) or not isinstance(ips, list) \
                or not ips or not all(isinstance(ip, str) for ip in ips):
            raise ValueError(f"hostfile {path}: host {i} needs \"ssh\" (a name) and \"ips\" (a non-empty list)")
        out.append((host["ssh"], list(ips)))
    return out


def ring_env(rank: ShardRank, folder: str | None = None) -> dict[str, str]:
    """The environment ``mlx.launch`` gives this rank: ``MLX_RANK`` and ``MLX_HOSTFILE`` (a file written now)."""
    fd, path = tempfile.mkstemp(prefix=f"mlxf-ring-{rank.rank}-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump([list(addrs) for addrs in rank.ring], f)
    return {"MLX_RANK": str(rank.rank), "MLX_HOSTFILE": path}


def rank_from_env(environ: Mapping[str, str], **bounds: Any) -> ShardRank | None:
    """The rank ``mlx.launch`` started this process as (``MLX_RANK``, ``MLX_HOSTFILE``), or None."""
    if "MLX_RANK" not in environ or not environ.get("MLX_HOSTFILE"):
        return None
    try:
        with open(environ["MLX_HOSTFILE"]) as f:
            ring = json.load(f)
        rank = int(environ["MLX_RANK"])
    except (OSError, ValueError) as exc:
        raise ValueError(f"MLX_RANK/MLX_HOSTFILE: {exc}") from None
    if not isinstance(ring, list) or not all(isinstance(a, list) and all(isinstance(x, str) for x in a) for a in ring):
        raise ValueError("MLX_HOSTFILE: expected a JSON list of [\"ip:port\", ...] per rank")
    return ShardRank(rank, tuple(tuple(a) for a in ring), **bounds)


class ProcessGroup:
    """The rank processes of one group, as one process (:class:`actors.proc.Process`).

    ``ranks[0]`` is rank 0, the worker the broker sees. ``terminate`` asks only rank 0 to
    stop: it tells its followers, which then exit. ``kill`` ends every rank.
    """

    def __init__(self, ranks: Sequence[Process], host: str | None = None) -> None:
        if not ranks:
            raise ValueError("a process group needs at least one rank")
        self.ranks = list(ranks)
        self.host = host or socket.gethostname()
        self._exitcode: int | None = None

    @property
    def pid(self) -> int | None:
        """Rank 0's pid: the one the broker knows from its ``ready``."""
        return self.ranks[0].pid

    @property
    def exitcode(self) -> int | None:
        """None while every rank runs; after that, the status of the first rank seen gone."""
        self.is_alive()
        return self._exitcode

    def is_alive(self) -> bool:
        """True while every rank runs. The first time one is found gone, the others are killed."""
        if self._exitcode is not None:
            return False
        gone = [p for p in self.ranks if not p.is_alive()]
        if not gone:
            return True
        code = gone[0].exitcode
        self._exitcode = code if code is not None else -1
        for p in self.ranks:
            if p.is_alive():
                p.kill()
        return False

    def terminate(self) -> None:
        """SIGTERM rank 0 (its close() ends the group; followers that outlive it are killed later)."""
        if self.ranks[0].is_alive():
            self.ranks[0].terminate()

    def kill(self) -> None:
        """SIGKILL every rank still running."""
        for p in self.ranks:
            if p.is_alive():
                p.kill()

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds in all for rank 0, then the followers, to exit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self.ranks:
            p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def view(self) -> list[dict[str, Any]]:
        """Each rank's pid and host, for `status`."""
        return [{"rank": i, "pid": p.pid, "host": self.host} for i, p in enumerate(self.ranks)]
