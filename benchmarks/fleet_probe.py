"""What a fleet's workers did during one benchmark run: paths, the step-time split, CPU.

:class:`FleetProbe` reads ``status`` before and after a run. The difference of the
workers' cumulative heartbeat stats says which path each request took (``solo``,
``batch``, ``handoff``), how many engine steps ran and how the workers' busy time split
between mlx-lm and their own code. CPU seconds of the broker, the workers and the
benchmark process itself (its client threads) come from ``/proc`` (Linux; absent
elsewhere), and show what the transport costs next to the engine.

Heartbeats arrive once a second, so a reading waits (up to a timeout) until the workers'
per-path request counts have caught up with the requests the broker saw them finish.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

PATHS = ("solo", "batch", "handoff")
SUMMED = ("steps", "decode_steps", "generated_tokens", "solo_steps", "batch_steps", "handoffs", "step_cycles",
          "mlx_s", "own_s", "busy_s", "prompt_cache_hits", "prompt_cache_hit_tokens", *(f"requests_{p}" for p in PATHS))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, from /proc; None when unreadable."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ProbeReading:
    """Summed worker stats and CPU seconds by role at one moment."""

    stats: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float | None] = field(default_factory=dict)
    served: int = 0  # requests the broker saw these workers finish
    settled: bool = True  # the heartbeat stats had caught up with ``served``


class FleetProbe:
    """Reads one model's workers (and the broker) through a client's ``status``."""

    def __init__(self, client: Any, model: str) -> None:
        self.client = client
        self.model = model

    def read(self) -> ProbeReading:
        """The workers' summed stats and the CPU seconds of broker, workers and this process."""
        status = self.client.status()
        workers = (status.get("models", {}).get(self.model) or {}).get("workers", [])
        stats = {k: float(sum((w.get("stats") or {}).get(k, 0) for w in workers)) for k in SUMMED}
        served = sum(int(w.get("served") or 0) for w in workers)
        pids = {"broker": [(status.get("broker") or {}).get("pid")], "worker": [w.get("pid") for w in workers],
                "client": [os.getpid()]}
        cpu: dict[str, float | None] = {}
        for role, ids in pids.items():
            values = [cpu_seconds(p) for p in ids if isinstance(p, int)]
            cpu[role] = None if not values or any(v is None for v in values) else sum(v for v in values if v is not None)
        return ProbeReading(stats, cpu, served, sum(stats[f"requests_{p}"] for p in PATHS) >= served)

    def settled(self, *, timeout_s: float = 3.0) -> ProbeReading:
        """A reading whose heartbeat stats count every request the workers finished (or the last one tried)."""
        deadline = time.monotonic() + timeout_s
        reading = self.read()
        while not reading.settled and time.monotonic() < deadline:
            time.sleep(0.05)
            reading = self.read()
        return reading

    def before(self) -> ProbeReading:
        """A reading to take right before a run."""
        return self.settled()

    def after(self, before: ProbeReading, *, timeout_s: float = 3.0) -> dict[str, Any]:
        """What the workers did since ``before`` (CPU up to now; stats once a heartbeat covers the run)."""
        cpu_now = self.read().cpu_s  # CPU right at the end of the run, before any wait
        reading = self.settled(timeout_s=timeout_s)
        delta = {k: reading.stats.get(k, 0.0) - before.stats.get(k, 0.0) for k in SUMMED}
        cpu = {role: (None if cpu_now.get(role) is None or before.cpu_s.get(role) is None
                      else cpu_now[role] - before.cpu_s[role])  # type: ignore[operator]
               for role in cpu_now}
        return summarize(delta, cpu, complete=before.settled and reading.settled)


def summarize(delta: dict[str, float], cpu_s: dict[str, float | None], *, complete: bool = True) -> dict[str, Any]:
    """Per-run engine figures: requests by path, steps, the split per step and as a share, CPU by role."""
    steps = delta.get("steps", 0.0)
    busy = delta.get("mlx_s", 0.0) + delta.get("own_s", 0.0)
    return {
        "paths": {p: int(delta.get(f"requests_{p}", 0)) for p in PATHS},
        "handoffs": int(delta.get("handoffs", 0)), "steps": int(steps), "decode_steps": int(delta.get("decode_steps", 0)),
        "solo_steps": int(delta.get("solo_steps", 0)), "batch_steps": int(delta.get("batch_steps", 0)),
        "mean_batch": delta["generated_tokens"] / delta["decode_steps"] if delta.get("decode_steps") else 0.0,
        "cache_hits": int(delta.get("prompt_cache_hits", 0)), "cache_hit_tokens": int(delta.get("prompt_cache_hit_tokens", 0)),
        "mlx_s": delta.get("mlx_s", 0.0), "own_s": delta.get("own_s", 0.0),
        "mlx_ms_per_step": delta.get("mlx_s", 0.0) / steps * 1000 if steps else 0.0,
        "own_ms_per_step": delta.get("own_s", 0.0) / steps * 1000 if steps else 0.0,
        "own_pct": delta.get("own_s", 0.0) / busy * 100 if busy else 0.0,
        "cpu_s": cpu_s, "complete": complete,
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' figures as one (counts and seconds added, per-step figures recomputed)."""
    if not runs:
        return {}
    delta: dict[str, float] = {"steps": 0.0, "decode_steps": 0.0, "generated_tokens": 0.0, "mlx_s": 0.0, "own_s": 0.0}
    cpu: dict[str, float | None] = {}
    for r in runs:
        for p in PATHS:
            delta[f"requests_{p}"] = delta.get(f"requests_{p}", 0.0) + r["paths"][p]
        for k in ("handoffs", "solo_steps", "batch_steps", "steps", "decode_steps", "mlx_s", "own_s"):
            delta[k] = delta.get(k, 0.0) + r[k]
        delta["prompt_cache_hits"] = delta.get("prompt_cache_hits", 0.0) + r["cache_hits"]
        delta["prompt_cache_hit_tokens"] = delta.get("prompt_cache_hit_tokens", 0.0) + r["cache_hit_tokens"]
        delta["generated_tokens"] += r["mean_batch"] * r["decode_steps"]
        for role, v in r["cpu_s"].items():
            cpu[role] = None if v is None or (role in cpu and cpu[role] is None) else (cpu.get(role) or 0.0) + v
    return summarize(delta, cpu, complete=all(r["complete"] for r in runs))


ENGINE_HEADER = ("| configuration | solo | batch | handoff | steps | mean batch | prompt-cache hits (tokens) "
                 "| mlx-lm ms/step | own ms/step | own % | CPU s: worker / broker / client |")


def engine_table(rows: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """One row per fleet configuration: requests by path, steps, the split, CPU by role."""
    lines = [ENGINE_HEADER, "|---|" + "---:|" * 10]
    for key, e in rows.items():
        if not e:
            continue
        cpu = " / ".join("—" if e["cpu_s"].get(r) is None else f"{e['cpu_s'][r]:.1f}" for r in ("worker", "broker", "client"))
        mark = "" if e["complete"] else " (heartbeat late)"
        lines.append(f"| {labels.get(key, key)}{mark} | {e['paths']['solo']} | {e['paths']['batch']} | "
                     f"{e['paths']['handoff']} | {e['steps']} | {e['mean_batch']:.2f} | "
                     f"{e['cache_hits']} ({e['cache_hit_tokens']}) | {e['mlx_ms_per_step']:.2f} | "
                     f"{e['own_ms_per_step']:.2f} | {e['own_pct']:.1f} | {cpu} |")
    return "\n".join(lines)


ENGINE_NOTE = ("Engine figures come from the workers' heartbeat stats, read before and after each run: requests by "
               "path (solo: mlx-lm's generate_step alone; batch: the BatchGenerator; handoff: solo, then moved into "
               "the batch), engine steps, mean sequences per decode step, prompt-cache hits (and the prompt tokens "
               "they saved), and each step cycle's wall time split into time inside mlx-lm and the worker's own code "
               "around it. CPU seconds are per process role over the run (client = the benchmark process and its "
               "client threads). The bare BatchGenerator's row (concurrent runs) is measured the same way in its own "
               "loop: time inside BatchGenerator.next against the rest, and the CPU of the benchmark process, which "
               "is its engine.")
