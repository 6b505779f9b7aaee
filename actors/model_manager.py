"""The supervisor's side of runtime model management: which models run, on which workers.

The broker decides when (``broker/lifecycle.py``); the supervisor's loop hands
this object the broker's calls (``load``, ``start``, ``stop``; see
:mod:`actors.control`) and sends back the answer each returns. It keeps the
models the supervisor runs, checks the memory budget, and asks the children
registry (:mod:`actors.children`) to start workers or to retire them.

Worker ids are ``NAME-i`` for the first generation of a model and ``NAME-i.G``
after that, so a process that is still on its way out never shares an id (and a
ZeroMQ identity) with its successor.

What a model SOURCE is (whether it can load, how large its weights are) is the
workers' knowledge: the composition root passes it in as two functions.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from actors.children import ChildSpec, Children, WorkerSpec
from actors.config import FleetConfig, ModelSpec
from actors.control import Start, Stop
from actors.protocol import (
    BAD_REQUEST, INTERNAL, OVER_BUDGET, UNKNOWN_MODEL, Addressed, ControlReply, Error, Load, Message,
)

log = logging.getLogger("mlx_fleet.supervisor")

MIB = 1024 * 1024


def fmt_bytes(n: int) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n / MIB:.1f} MiB"


def budget_verdict(*, budget_bytes: int, loaded_bytes: int, each_bytes: int | None, replicas: int, what: str,
                   ranks: int = 1) -> str:
    """Why ``replicas`` x ``each_bytes`` more would not fit ``budget_bytes`` (0: no limit), or ''.

    ``ranks`` > 1: each replica is a sharded group whose ranks here hold ``each_bytes`` each
    (the weights over the group's size), so one replica costs ``ranks`` x ``each_bytes``.
    """
    if not budget_bytes or replicas == 0:
        return ""
    if each_bytes is None:
        return (f"{what} refused: cannot estimate its size (no *.safetensors on disk), "
                f"and memory_budget_bytes={budget_bytes} is set")
    need = each_bytes * ranks * replicas
    if loaded_bytes + need <= budget_bytes:
        return ""
    shape = f"{replicas} x {ranks} ranks x {fmt_bytes(each_bytes)}" if ranks > 1 else f"{replicas} x {fmt_bytes(each_bytes)}"
    return (f"{what} refused: it needs an estimated {fmt_bytes(need)} ({shape} of "
            f"*.safetensors), {fmt_bytes(loaded_bytes)} is already loaded, and memory_budget_bytes is "
            f"{fmt_bytes(budget_bytes)} ({budget_bytes} bytes)")


def per_rank_bytes(weights_bytes: int | None, shards: int) -> int | None:
    """What one rank of a ``shards``-way group holds of ``weights_bytes``: its share, rounded up."""
    return None if weights_bytes is None else -(-weights_bytes // max(1, shards))


class ModelManager:
    """The models a supervisor runs, their workers' ids, and the memory budget."""

    def __init__(self, cfg: FleetConfig, children: Children, *, check_source: Callable[[str], None],
                 weights_bytes: Callable[[str], int | None]) -> None:
        self.cfg = cfg
        self.children = children
        self.check_source = check_source
        self.weights_bytes = weights_bytes
        self.specs: dict[str, ModelSpec] = {m.name: m for m in cfg.models}
        self.generations: dict[str, int] = {}
        self._weights: dict[str, int | None] = {}

    def add_configured(self) -> None:
        """Register (not start) the workers of every configured model that is not on-demand."""
        for spec in self.specs.values():
            if not spec.on_demand:
                for ws in self.worker_specs(spec, spec.replicas):
                    self.children.add(ChildSpec.for_worker(ws))

    # ---- calls -----------------------------------------------------------------------

    def handle(self, msg: Message) -> Addressed:
        """Run one call from the broker (load, start or stop); every call gets one answer."""
        try:
            if isinstance(msg, Load):
                reply = self.load(msg)
            elif isinstance(msg, Start):
                reply = self.start(msg.model)
            elif isinstance(msg, Stop):
                reply = self.stop(msg.model, forget=msg.forget)
            else:
                reply = Error(BAD_REQUEST, f"the supervisor does not take {msg.TYPE!r} calls")
        except Exception as exc:  # a failed call answers with an error; the supervisor goes on
            log.exception("control call %s failed", msg.TYPE)
            reply = Error(INTERNAL, f"{msg.TYPE} failed: {type(exc).__name__}: {exc}")
        reply.request_id = msg.request_id if isinstance(msg, Addressed) else None
        return reply

    def load(self, msg: Load) -> Addressed:
        """Add a model and start its replicas (none yet when on-demand)."""
        if msg.model in self.specs:
            return Error(BAD_REQUEST, f"model {msg.model!r} is already loaded")
        try:
            self.check_source(msg.source)
        except (FileNotFoundError, ValueError) as exc:
            return Error(BAD_REQUEST, str(exc))
        spec = ModelSpec(msg.model, msg.source, msg.replicas, self.cfg.batching, msg.on_demand,
                         msg.idle_unload_s if msg.idle_unload_s is not None else ModelSpec.idle_unload_s,
                         msg.dtype or self.cfg.dtype)
        if spec.on_demand:
            self.specs[spec.name] = spec
            return ControlReply("load", spec.name, "on demand: starts at its first request")
        problem = self.budget_problem(spec.source, spec.replicas, f"load {spec.name}")
        if problem:
            return Error(OVER_BUDGET, problem)
        self.specs[spec.name] = spec
        ids = self.spawn(spec, spec.replicas)
        return ControlReply("load", spec.name, f"starting {len(ids)} replica(s)", ids)

    def start(self, name: str) -> Addressed:
        """Start an on-demand model's replicas (nothing to do if they run)."""
        spec = self.specs.get(name)
        if spec is None:
            return Error(UNKNOWN_MODEL, f"model {name!r} is not loaded")
        if self.children.workers(name, include_gave_up=False):
            return ControlReply("start", name, "already running")
        count = max(1, spec.replicas)
        problem = self.budget_problem(spec.source, count, f"start {name}", spec.shards)
        if problem:
            return Error(OVER_BUDGET, problem)
        ids = self.spawn(spec, count)
        return ControlReply("start", name, f"starting {len(ids)} replica(s)", ids)

    def stop(self, name: str, *, forget: bool) -> Addressed:
        """Retire a model's worker processes (SIGTERM now, SIGKILL after the registry's grace)."""
        if forget:
            self.specs.pop(name, None)  # a model served only by remote workers has no spec here
        workers = self.children.workers(name)
        ids = [c.worker_id or c.name for c in workers]
        self.children.retire(workers)
        log.info("%s %s: stopping %s", "unload" if forget else "idle stop", name, ", ".join(ids) or "no workers")
        return ControlReply("unload" if forget else "stop", name, f"stopping {len(ids)} worker(s)", ids)

    # ---- workers -----------------------------------------------------------------------

    def worker_specs(self, spec: ModelSpec, count: int) -> list[WorkerSpec]:
        """``count`` workers of ``spec`` under the model's next generation of ids."""
        gen = self.generations.get(spec.name, -1) + 1
        self.generations[spec.name] = gen
        share = self.memory_share()
        return [WorkerSpec(f"{spec.name}-{i}" if gen == 0 else f"{spec.name}-{i}.{gen}", spec.name, spec.source,
                           spec.batching, spec.dtype, spec.shards, spec.shard_mode, spec.chat_template,
                           spec.tool_format, memory_share=share) for i in range(count)]

    def memory_share(self) -> int:
        """Worker processes that share this machine's memory: every replica's ranks of the models run here
        (on-demand ones included, as they may run at once)."""
        return max(1, sum(max(1, s.replicas) * s.shards for s in self.specs.values() if s.replicas or s.on_demand))

    def spawn(self, spec: ModelSpec, count: int) -> list[str]:
        """Start ``count`` workers of ``spec``; their ids."""
        ids = []
        for ws in self.worker_specs(spec, count):
            self.children.start(self.children.add(ChildSpec.for_worker(ws)).name)
            ids.append(ws.worker_id)
        return ids

    # ---- the budget ----------------------------------------------------------------------

    def weights(self, source: str) -> int | None:
        """Estimated bytes of one replica of ``source`` (its *.safetensors), cached."""
        if source not in self._weights:
            self._weights[source] = self.weights_bytes(source)
        return self._weights[source]

    def replica_bytes(self, source: str, shards: int) -> int | None:
        """Estimated bytes one replica holds here: its weights, or each rank's share times its ranks."""
        each = per_rank_bytes(self.weights(source), shards)
        return None if each is None else each * shards

    def loaded_bytes(self) -> int:
        """The estimated weights of every worker child that has not been given up on."""
        return sum(self.replica_bytes(c.spec.worker.source, c.spec.worker.shards) or 0
                   for c in self.children.workers(include_gave_up=False) if c.spec.worker is not None)

    def budget_problem(self, source: str, replicas: int, what: str, shards: int = 1) -> str:
        """Why ``replicas`` more of ``source`` (each a group of ``shards`` ranks) would not fit memory_budget_bytes, or ''."""
        budget = self.cfg.memory_budget_bytes
        if not budget or replicas == 0:
            return ""
        return budget_verdict(budget_bytes=budget, loaded_bytes=self.loaded_bytes(),
                              each_bytes=per_rank_bytes(self.weights(source), shards), replicas=replicas,
                              what=f"{what} ({source!r})", ranks=shards)

    def startup_problem(self) -> str:
        """Why the configured models do not fit the memory budget, or ''."""
        if not self.cfg.memory_budget_bytes:
            return ""
        total = 0
        for spec in self.specs.values():
            if spec.on_demand or spec.replicas == 0:
                continue
            each = self.replica_bytes(spec.source, spec.shards)
            if each is None:
                return f"cannot estimate the size of model {spec.name} ({spec.source!r}) for memory_budget_bytes"
            total += each * spec.replicas
        if total > self.cfg.memory_budget_bytes:
            return (f"the configured models need an estimated {fmt_bytes(total)} of weights, over "
                    f"memory_budget_bytes={self.cfg.memory_budget_bytes} ({fmt_bytes(self.cfg.memory_budget_bytes)})")
        return ""

    # ---- what the broker is told -----------------------------------------------------------

    def models_view(self) -> list[dict[str, Any]]:
        """The models run, for the supervisor's state message."""
        return [{"name": s.name, "source": s.source, "replicas": s.replicas, "on_demand": s.on_demand,
                 "idle_unload_s": s.idle_unload_s, "shards": s.shards} for s in self.specs.values()]

    def memory_view(self) -> dict[str, Any]:
        """The memory budget and the estimated weights loaded (None without a budget)."""
        budget = self.cfg.memory_budget_bytes
        return {"budget_bytes": budget, "loaded_bytes": self.loaded_bytes() if budget else None}
