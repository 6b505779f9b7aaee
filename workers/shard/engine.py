"""A sharded replica's engine: every rank runs the same engine operations, rank 0 decides them.

A group of ranks (:mod:`actors.shard_group`) serves one model whose weights are split by
mlx-lm's ``sharded_load`` over MLX's ``ring`` backend: ``tensor`` mode splits every layer's
matrices (an ``all_sum`` per layer), ``pipeline`` mode gives each rank a run of layers.
Either way each forward pass is a collective, so every rank must run the same engine
operations in the same order, on the same token ids.

Rank 0 is the worker the broker sees. Its worker talks to a :class:`ShardedEngine`, which
has the :class:`workers.engine.adapter.Engine` interface: each operation that changes the engine
(insert, step, remove, the admission batch) goes to the followers over the op channel
(:mod:`workers.shard.channel`) first, then runs locally. A follower
(:mod:`workers.shard.follower`) applies the same operations to its own ``Engine``
(:func:`apply_op`). Only rank 0's output reaches the broker.

The followers sample too, and agree with rank 0 by construction: all ranks compute the
same logits (an ``all_sum`` leaves the same values on every rank), a greedy request takes
their argmax, a seeded request draws from its own key, and unseeded requests draw from
MLX's global generator, which every rank seeds with the same value when the group forms
and then advances through the same calls in the same order. The solo path and the shared
samplers (:mod:`workers.engine.sampling`) keep that order because the engine's decisions
(solo or batch, a handoff, prompt-cache hits, stop strings) depend only on the operations
and the tokens. Each follower reports a digest of each step's events and rank 0 checks it
(:class:`workers.shard.channel.StepLedger`): a group whose ranks disagree ends.

A group that breaks (a rank dies, hangs or disagrees) is not repaired: the rank that sees
it exits (:func:`workers.shard.channel.die`) and the whole group is restarted; the broker
handles its requests as for any lost worker.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import random
import socket
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ParamSpec, Protocol, TypeVar, cast

import mlx.core as mx
import msgpack
import zmq

from actors.clock import Clock, MonotonicClock
from actors.config import BatchingConfig, fixed_capacity
from actors.shard_group import ShardRank
from workers.capacity import CapacityPlan, agree, plan_capacity
from workers.engine.adapter import Engine, make_engine
from workers.engine.interface import EngineLike, EngineRequest, StepEvent
from workers.engine.prompt_cache import PromptCacheStats
from workers.engine.stats import StepStats
from workers.engine.tool_setup import ToolSettings, model_tools
from workers.models.precision import apply_dtype, load_model
from workers.tools import ToolSupport
from workers.shard.channel import (
    REQUEST_FIELDS, BeatTracker, FollowerChannel, GroupLost, GroupWatch, Rank0Channel, OpError, StallCheck,
    StepLedger, die,
)

log = logging.getLogger("mlx_fleet.shard")

# Pipeline ranks hold different layers, so their KV caches differ in size: a byte bound would
# evict differently on each rank. There the prompt cache is bounded by its entry count alone.
UNBOUNDED_CACHE_BYTES = 1 << 62

P = ParamSpec("P")
T = TypeVar("T")


class EngineSettings(ToolSettings, Protocol):
    """What loading an engine needs of a worker's settings (read-only: they are frozen): its tools' settings and these."""

    @property
    def dtype(self) -> str: ...
    @property
    def batching(self) -> BatchingConfig: ...
    @property
    def shard(self) -> ShardRank | None: ...
    @property
    def memory_share(self) -> int: ...  # worker processes sharing this machine (workers/capacity.py, workers/blas.py)


@dataclass
class LoadedEngine:
    """A worker's engine once its model is loaded: the model, its decode capacity and what ``ready`` says of it."""

    engine: EngineLike
    model: Any
    capacity: CapacityPlan
    info: dict[str, Any] = field(default_factory=dict)


def size_capacity(model: Any, s: EngineSettings, shards: int = 1) -> CapacityPlan:
    """This process's decode capacity (workers/capacity.py): from its memory, unless a number is set."""
    if fixed_capacity(s.batching) is not None:
        return plan_capacity(s.batching, kv=None, free=None)
    from workers.engine.memory import free_memory, kv_shape

    return plan_capacity(s.batching, kv=kv_shape(model), free=free_memory(), share=s.memory_share, shards=shards)


@dataclass
class GroupMember:
    """One rank once its group has formed: its engine, its end of the op channel, the ranks."""

    shard: ShardRank
    engine: Engine
    model: Any
    mode: str  # tensor | pipeline: what sharded_load applied
    ctx: zmq.SyncContext
    capacity: CapacityPlan
    rank0: Rank0Channel | None = None
    follower: FollowerChannel | None = None
    ranks: list[dict[str, Any]] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """The group for ``ready`` and `status`: its size, mode, and each rank's pid and host."""
        return {"shards": self.shard.size, "shard_mode": self.mode, "ranks": self.ranks}


def load_sharded(path: str, dtype: str, mode: str, group: Any) -> tuple[Any, Any, str]:
    """mlx-lm's ``sharded_load`` of ``path`` over ``group``: model, tokenizer and the mode applied.

    ``auto`` is tensor parallelism where the model supports it, else pipeline parallelism.
    """
    from mlx_lm.utils import sharded_load

    if mode in ("auto", "tensor"):
        try:
            model, tokenizer = sharded_load(path, tensor_group=group)
            return apply_dtype(model, dtype), tokenizer, "tensor"
        except ValueError as exc:
            if mode == "tensor" or "tensor parallelism" not in str(exc):
                raise
            log.info("this model has no tensor parallelism; sharding it by pipeline")
    model, tokenizer = sharded_load(path, pipeline_group=group)
    return apply_dtype(model, dtype), tokenizer, "pipeline"


def form_group(path: str, s: EngineSettings, ctx: zmq.SyncContext, clock: Clock | None = None) -> GroupMember:
    """Join the ring, load this rank's shard, and connect the op channel (rank 0 waits for every follower).

    Bounded by ``start_timeout_s``: MLX's ring waits for absent peers holding the GIL, so the bound is
    faulthandler's, which needs no Python thread and ends the process.
    """
    shard = s.shard
    assert shard is not None
    clock = clock or MonotonicClock()
    deadline_s = clock.now() + shard.start_timeout_s
    faulthandler.dump_traceback_later(shard.start_timeout_s, exit=True)
    try:
        group = mx.distributed.init(backend="ring", strict=True)
        if (group.rank(), group.size()) != (shard.rank, shard.size):
            raise RuntimeError(f"the ring says rank {group.rank()} of {group.size()}, not {shard.rank} of {shard.size}")
        model, tokenizer, mode = load_sharded(path, s.dtype, shard.mode, group)
        rank0 = Rank0Channel(ctx, shard.own_host) if shard.rank == 0 else None
        plan = size_capacity(model, s, shard.size)
        mine = [rank0.ops_port, rank0.beat_port, random.randrange(1, 2**31 - 1)] if rank0 else [0, 0, 0]
        mine += [plan.capacity if r == shard.rank else 0 for r in range(shard.size)]  # each rank's own capacity
        summed = mx.distributed.all_sum(mx.array(mine, dtype=mx.int32), group=group, stream=mx.cpu)
        shared = [int(v) for v in cast(list[int], summed.tolist())]
        ops_port, beat_port, seed = shared[:3]
        mx.random.seed(seed)  # unseeded sampling draws the same keys on every rank
        plan = group_capacity(plan, shared[3:])
        keep_bytes = s.batching.prompt_cache_bytes
        engine = make_engine(model, tokenizer, dataclasses.replace(s.batching, decode_capacity=plan.capacity),
                             prompt_cache_bytes=keep_bytes if mode == "tensor" or not keep_bytes else UNBOUNDED_CACHE_BYTES,
                             tools=model_tools(tokenizer, s) if shard.rank == 0 else None)
        pid, host = os.getpid(), socket.gethostname()
        me: dict[str, Any] = {"rank": shard.rank, "pid": pid, "host": host}
        member = GroupMember(shard, engine, model, mode, ctx, plan, rank0=rank0, ranks=[me])
        if rank0 is not None:
            hellos = rank0.wait_hellos(range(1, shard.size), max(0.0, deadline_s - clock.now()), clock)
            member.ranks += [hellos[r] for r in sorted(hellos)]
        else:
            member.follower = FollowerChannel(ctx, shard.rank, shard.rank0_host, ops_port, beat_port)
            member.follower.hello(pid, host)
        log.info("rank %d of %d joined its group (%s parallel)", shard.rank, shard.size, mode)
        return member
    finally:
        faulthandler.cancel_dump_traceback_later()


def group_capacity(own: CapacityPlan, ranks: list[int]) -> CapacityPlan:
    """The group's capacity: every rank runs the same batch, so the smallest any rank can hold."""
    agreed = agree(ranks)
    if agreed == own.capacity:
        return own
    return dataclasses.replace(own, capacity=agreed, reason=f"{own.reason}; the group's smallest rank: {agreed}",
                               inputs={**own.inputs, "ranks": ranks})


def digest(events: list[StepEvent]) -> int:
    """A checksum of what one step produced: each request's key, token ids and finish reason."""
    return zlib.crc32(msgpack.packb([[e.key, e.token_ids, e.finish_reason] for e in events], use_bin_type=True))


def apply_op(engine: Engine, op: list[Any]) -> list[StepEvent]:
    """Apply one op from rank 0 (already checked) to a follower's engine; a step's or removal's events."""
    name = op[0]
    if name == "insert":
        engine.insert([EngineRequest(**r) for r in op[1]])
    elif name == "step":
        return engine.step()
    elif name == "remove":
        return engine.remove(op[1], op[2])
    elif name == "admission":
        engine.set_admission_batch(op[1])
    else:
        raise OpError(f"op {name!r} is not an engine operation")
    return []


class ShardedEngine(EngineLike):
    """Rank 0's engine: the :class:`EngineLike` interface, each change sent to the followers first.

    Reads (``active``, ``free_slots``, ``stats``, ``cache_stats``, ``solo_fast_path``,
    ``encode_prompt``) are rank 0's own: the followers' engines hold the same state.
    """

    def __init__(self, member: GroupMember, *, clock: Clock | None = None, fail: Callable[[str], None] = die) -> None:
        assert member.rank0 is not None
        self.member = member
        self.engine = member.engine
        self.prompt_cache = member.engine.prompt_cache  # rank 0's; the followers' hold the same entries
        self.channel = member.rank0
        self.fail = fail
        clock = clock or MonotonicClock()
        self.stall = StallCheck(clock, member.shard.op_timeout_s)
        self.ledger = StepLedger(frozenset(range(1, member.shard.size)))
        self.seq = 0
        tracker = BeatTracker(clock, range(1, member.shard.size), member.shard.beat_timeout_s)
        self.watch = GroupWatch(self.stall, rank=0, beats_in=self.channel.beats, tracker=tracker, fail=fail)
        self.watch.start()

    # ---- reads --------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests inserted and not yet finished or removed."""
        return self.engine.active

    @property
    def free_slots(self) -> int:
        """How many more sequences may be inserted."""
        return self.engine.free_slots

    @property
    def cache_stats(self) -> PromptCacheStats:
        """Rank 0's prompt-cache figures (the followers' caches hold the same entries)."""
        return self.engine.cache_stats

    @property
    def stats(self) -> StepStats:
        """Rank 0's step figures, with ``shard_checked_steps`` kept current."""
        return self.engine.stats

    @property
    def solo_fast_path(self) -> bool:
        """Whether a lone request decodes on the solo path (on every rank alike)."""
        return self.engine.solo_fast_path

    @property
    def tool_support(self) -> ToolSupport:
        """Rank 0's: the tokenizer and its template are rank 0's alone."""
        return self.engine.tool_support

    def encode_prompt(self, prompt: str | None, messages: list[dict[str, Any]] | None, tokens: list[int] | None,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids for a prompt (the tokenizer is rank 0's alone; the ids travel with the insert)."""
        return self.engine.encode_prompt(prompt, messages, tokens, tools)

    @property
    def vocab_size(self) -> int:
        """Width of the model's logits."""
        return self.engine.vocab_size

    def compile_grammar(self, spec: dict[str, Any]) -> Any:
        """Never called: a group refuses grammars (``controls_refused``)."""
        raise ValueError("a sharded group does not apply grammars")

    def prepare_logprobs(self) -> None:
        """Nothing to prepare: a group refuses logprobs."""

    def controls_refused(self) -> str | None:
        """Decoding controls and n > 1 would have to travel to every rank with the insert: not done yet."""
        return "a sharded group does not apply decoding controls yet"

    # ---- changes --------------------------------------------------------------------------

    def insert(self, reqs: list[EngineRequest]) -> None:
        """Insert on every rank."""
        # The fields the followers take (channel.REQUEST_FIELDS): n and controls are refused before this.
        self._send(["insert", [{k: v for k, v in dataclasses.asdict(r).items() if k in REQUEST_FIELDS} for r in reqs]])
        self._apply("insert", self.engine.insert, reqs)

    def step(self) -> list[StepEvent]:
        """Step every rank; rank 0's events, checked against the followers' reports as they come."""
        self.seq += 1
        self._send(["step", self.seq])
        events = self._apply("step", self.engine.step)
        try:
            self.ledger.record(self.seq, digest(events))
            for rank, seq, theirs in self.channel.reports():
                self.ledger.report(rank, seq, theirs)
        except (GroupLost, OpError) as exc:
            self.fail(str(exc))
        self.engine.stats.shard_checked_steps = self.ledger.checked
        return events

    def remove(self, keys: list[str], reason: str = "cancelled") -> list[StepEvent]:
        """Remove on every rank."""
        self._send(["remove", list(keys), reason])
        return self._apply("remove", self.engine.remove, list(keys), reason)

    def set_admission_batch(self, n: int) -> None:
        """Change the prefill batch on every rank."""
        self._send(["admission", int(n)])
        self.engine.set_admission_batch(n)

    def close(self) -> None:
        """Tell the followers to stop, then release everything."""
        self.watch.stop()
        try:
            self.channel.send(["close"])
        except GroupLost:
            pass  # a follower already gone needs no goodbye
        self.channel.close(flush_s=1.0)
        self.engine.close()
        self.member.ctx.term()

    def _send(self, msg: list[Any]) -> None:
        try:
            self.channel.send(msg)
        except GroupLost as exc:
            self.fail(str(exc))

    def _apply(self, what: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            with self.stall.busy(what):
                return fn(*args, **kwargs)
        except Exception as exc:  # a collective that failed (a peer died) leaves the group's state unknown
            self.fail(f"{what} failed on rank 0: {type(exc).__name__}: {exc}")
            raise


def load_engine(path: str, s: EngineSettings) -> LoadedEngine:
    """The worker's engine for the model at ``path``, with its decode capacity and what ``ready`` says of its group.

    Unsharded (``s.shard`` None): a plain :class:`Engine`. Rank 0 of a group: a
    :class:`ShardedEngine` once every follower has joined. Followers run
    :mod:`workers.shard.follower` instead.
    """
    if s.shard is None:
        model, tokenizer = load_model(path, s.dtype)
        plan = size_capacity(model, s)
        engine = make_engine(model, tokenizer, dataclasses.replace(s.batching, decode_capacity=plan.capacity),
                             tools=model_tools(tokenizer, s))
        return LoadedEngine(engine, model, plan)
    if s.shard.rank != 0:
        raise ValueError(f"rank {s.shard.rank} is a follower; only rank 0 serves the broker")
    member = form_group(path, s, zmq.Context())
    return LoadedEngine(ShardedEngine(member), member.model, member.capacity, member.info())
