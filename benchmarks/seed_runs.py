"""How the seed comparison runs its systems: back to back or alternating, under a deadline.

A :class:`System` is one configuration kept up for the whole run: a function that runs
prompts with a number of clients, and for a fleet a :class:`benchmarks.fleet_probe.FleetProbe`
that says which path each request took and where the worker's time went.

Two orders for the sequential variant:

- ``back-to-back`` (the seed's): each system answers all the questions, one after another,
  then the next system does.
- ``alternating``: question by question, each system answers it in turn, so the fleet's
  requests never follow one another directly and every system sees the same drift.

With a deadline, :func:`measure` starts a run only when the longest run so far still fits,
and says in its result what it left out. ``on_progress`` is called after every run with
the data so far, so a report can be written before anything could cut the process off.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any, Callable

from benchmarks import tables
from benchmarks.common import progress
from benchmarks.concurrency import prompts_for
from benchmarks.fleet_probe import FleetProbe, ProbeReading
from benchmarks.load import LoadRun, RequestSample

RunFn = Callable[[list[str], int], LoadRun]  # (prompts, clients) -> one measured run
RESERVE_S = 5.0  # kept free before a deadline for writing the report


@dataclasses.dataclass
class System:
    """One configuration under test: how to run it, and (for a fleet) how to look inside it."""

    key: str
    run: RunFn
    probe: FleetProbe | None = None


@dataclasses.dataclass
class Plan:
    """What :func:`measure` runs: variants (name -> clients), repeats, prompts, order, deadline."""

    variants: dict[str, int]
    repeats: int
    questions: int
    warmup: int
    order: str = "back-to-back"
    deadline_s: float | None = None  # on time.monotonic(); None: no deadline


def rotated(keys: list[str], by: int) -> list[str]:
    """``keys`` starting at position ``by`` (mod len), wrapping around."""
    k = by % len(keys) if keys else 0
    return keys[k:] + keys[:k]


def run_probed(system: System, prompts: list[str], clients: int) -> LoadRun:
    """One run; a fleet's run carries its engine figures, with the path counts its clients saw."""
    before = system.probe.before() if system.probe else None
    run = system.run(prompts, clients)
    if system.probe is not None and before is not None:
        run.engine = system.probe.after(before)
        _client_paths(run.engine, run.samples)
    return run


def run_alternating(systems: list[System], prompts: list[str]) -> dict[str, LoadRun]:
    """Each prompt through every system in turn (one client); one run per system."""
    befores: dict[str, ProbeReading] = {s.key: s.probe.before() for s in systems if s.probe}
    samples: dict[str, list[RequestSample]] = {s.key: [] for s in systems}
    wall: dict[str, float] = dict.fromkeys(samples, 0.0)
    for prompt in prompts:
        for s in systems:
            one = s.run([prompt], 1)
            samples[s.key] += one.samples
            wall[s.key] += one.wall_s
    runs = {k: LoadRun(1, wall[k], samples[k]) for k in samples}
    for s in systems:
        if s.probe is not None:
            engine = s.probe.after(befores[s.key])
            engine["cpu_s"]["client"] = None  # the client process also ran the other systems meanwhile
            _client_paths(engine, samples[s.key])
            runs[s.key].engine = engine
    return runs


def _client_paths(engine: dict[str, Any], samples: list[RequestSample]) -> None:
    """Path counts from the replies themselves (exact even when a heartbeat is late)."""
    seen = Counter(s.path for s in samples if s.ok and s.path)
    if seen:
        engine["paths"] = {p: seen.get(p, 0) for p in engine["paths"]}


def warm_up(systems: dict[str, System], plan: Plan) -> None:
    """A few requests per system and client count: compile paths, fill caches."""
    for key, system in systems.items():
        for clients in sorted(set(plan.variants.values())):
            system.run(prompts_for(clients, 0, max(plan.warmup, 1) * clients, f"warm {key}"), clients)
    progress(f"seed: warmed up {len(systems)} systems")


def measure(systems: dict[str, System], plan: Plan, on_progress: Callable[[dict[str, Any]], None] | None = None
            ) -> dict[str, Any]:
    """Warm up, then every repeat x variant x configuration, interleaved; metrics, engine figures, samples."""
    keys = list(systems)
    data: dict[str, Any] = {
        "variants": plan.variants, "order": plan.order,
        "metrics": {v: {k: [] for k in keys} for v in plan.variants},
        "engine": {v: {k: [] for k in keys} for v in plan.variants},
        "samples": {v: {k: [] for k in keys} for v in plan.variants},
        "runs": [], "skipped": [], "planned": plan.repeats * len(plan.variants) * len(keys),
    }
    warm_up(systems, plan)
    longest_s, t_start = 0.0, time.monotonic()
    for rep in range(plan.repeats):
        for variant, clients in plan.variants.items():
            prompts = prompts_for(clients, 0, plan.questions, f"r{rep + 1}")
            order = rotated(keys, rep)
            alternate = variant == "sequential" and plan.order == "alternating"
            units = [order] if alternate else [[k] for k in order]
            for unit in units:
                if plan.deadline_s is not None and time.monotonic() + longest_s * 1.1 + RESERVE_S > plan.deadline_s:
                    data["skipped"] += [{"repeat": rep + 1, "variant": variant, "config": k} for k in unit]
                    continue
                t0 = time.monotonic()
                if alternate:
                    runs = run_alternating([systems[k] for k in unit], prompts)
                else:
                    runs = {unit[0]: run_probed(systems[unit[0]], prompts, clients)}
                seconds = time.monotonic() - t0
                longest_s = max(longest_s, seconds)
                for key, run in runs.items():
                    _record(data, variant, key, run, rep, seconds / len(runs))
                done = len(data["runs"])
                eta = (time.monotonic() - t_start) / done * (data["planned"] - done)
                progress(f"seed {done}/{data['planned']} (eta {eta:.0f} s): repeat {rep + 1} {variant} "
                         + ", ".join(_line(k, data["metrics"][variant][k][-1]) for k in runs))
                if on_progress is not None:
                    on_progress(data)
    return data


def _record(data: dict[str, Any], variant: str, key: str, run: LoadRun, rep: int, seconds: float) -> None:
    data["metrics"][variant][key].append(tables.run_metrics(run))
    data["engine"][variant][key].append(run.engine)
    data["samples"][variant][key].append([s.__dict__ for s in run.samples])
    data["runs"].append({"repeat": rep + 1, "variant": variant, "config": key, "seconds": seconds})


def _line(key: str, m: dict[str, float]) -> str:
    return (f"{key}: mean {m['response_mean_s'] * 1000:.1f} ms, TTFT {m['ttft_mean_s'] * 1000:.1f} ms, "
            f"{m['tok_per_s']:.1f} tok/s, ok {int(m['ok'])}/{int(m['requests'])}")
