"""A follower rank of a sharded group: it applies rank 0's engine operations, in order.

Its loop reads as ``while running: op = recv(); apply(op); report(step)``. It holds its
shard of the weights and its own :class:`workers.engine.adapter.Engine`, speaks to no broker, and
reports each step's digest to rank 0 (:mod:`workers.shard.engine`). It ends cleanly when rank 0
says ``close``; it exits with ``GROUP_LOST_EXIT`` when an operation fails, when rank 0's
connection drops, or when an operation runs past ``op_timeout_s`` (its watch,
:class:`workers.shard.channel.GroupWatch`). SIGTERM stops it between operations.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import zmq

from actors.clock import MonotonicClock
from actors.runtime import Hooks, run_process
from workers.shard.channel import GroupWatch, OpError, StallCheck, die
from workers.worker import WorkerSettings

if TYPE_CHECKING:  # imported where MLX may be: after the BLAS is chosen
    from workers.shard.engine import GroupMember

log = logging.getLogger("mlx_fleet.shard")

POLL_MS = 500  # how often an idle follower looks at its stop flag


class FollowerActor:
    """start (join the group), run (apply ops), close (release)."""

    def __init__(self, settings: WorkerSettings) -> None:
        if settings.shard is None or settings.shard.rank == 0:
            raise ValueError("a follower is a rank > 0 of a sharded group")
        self.s = settings
        self.running = True
        self.member: GroupMember | None = None
        self.watch: GroupWatch | None = None
        self.stall = StallCheck(MonotonicClock(), settings.shard.op_timeout_s)
        self.steps = 0

    def start(self) -> None:
        """Choose a BLAS, import MLX, join the group and load this rank's shard."""
        from workers.blas import find_blas, preload_blas, share_threads

        preload_blas(find_blas(self.s.blas), threads=share_threads(self.s.memory_share))
        from workers.models.sources import resolve_source
        from workers.shard.engine import form_group

        path = resolve_source(self.s.source, self.s.dtype)
        self.member = member = form_group(str(path), self.s, zmq.Context())
        channel = member.follower
        assert channel is not None  # a follower's group gives it its channel to rank 0
        self.watch = GroupWatch(self.stall, rank=member.shard.rank, beats_out=channel.beats,
                                monitor=channel.monitor)
        self.watch.start()

    def run(self) -> None:
        """Apply ops until rank 0 says close (or a stop is asked)."""
        from workers.shard.engine import apply_op, digest

        member = self.member
        assert member is not None and member.follower is not None  # setup succeeded
        channel = member.follower
        while self.running:
            try:
                op = channel.recv(POLL_MS)
            except OpError as exc:
                die(f"a malformed op from rank 0: {exc}")
                return
            if op is None:
                continue
            if op[0] == "close":
                log.info("rank 0 closed the group")
                return
            try:
                with self.stall.busy(op[0]):
                    events = apply_op(member.engine, op)
            except Exception as exc:  # the ranks no longer hold the same state
                log.exception("op %s failed", op[0])
                die(f"{op[0]} failed on rank {member.shard.rank}: {type(exc).__name__}: {exc}")
                return
            if op[0] == "step":
                self.steps += 1
                channel.report(op[1], digest(events))

    def close(self) -> None:
        """Stop the watch, close the channel, release the engine."""
        if self.watch is not None:
            self.watch.stop()
        if self.member is not None:
            if self.member.follower is not None:
                self.member.follower.close()
            self.member.engine.close()
            self.member.ctx.term()
        log.info("follower stopped after %d steps", self.steps)


def run_follower(settings: WorkerSettings) -> None:
    """Process entry point of a follower rank (rank >= 1 of a sharded worker group)."""
    assert settings.shard is not None

    def hooks() -> Hooks:
        actor = FollowerActor(settings)
        return Hooks(start=actor.start, run=actor.run, close=actor.close,
                     request_stop=lambda: setattr(actor, "running", False))

    run_process(f"worker:{settings.worker_id}/rank{settings.shard.rank}", settings.log_level, hooks)
