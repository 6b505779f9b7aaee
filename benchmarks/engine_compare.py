"""The worker's engine step against mlx-lm's own loops, side by side in one process.

- :func:`compare`: per-step time at each batch size for mlx-lm's ``generate_step`` (batch
  1), mlx-lm's ``BatchGenerator``, and the worker's ``Engine`` on its batch path (and on its
  solo path at batch 1). Every system keeps its own sequences; rounds interleave the systems
  (order rotated per round), each advancing the same number of steps, so all see the same
  sequence lengths and the same drift of the machine. The engine's steps also give the
  split of their time into mlx-lm's part and ours (:mod:`workers.engine.stats`).
- :func:`overlap`: how much host work between steps the step in flight hides. The engine
  steps with a fixed amount of busy host work after each step (standing in for
  detokenizing, messages and telemetry); the growth of the step cycle against no host
  work says how much of that work ran while MLX still computed.

Call from the thread that loaded the model (MLX arrays belong to a thread).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from actors.config import BatchingConfig, fixed_capacity

PROMPT = "A fixed prompt of a few words to start each sequence with."
MAX_TOKENS = 1_000_000  # nothing finishes while it is measured


def _engine(model: Any, tokenizer: Any, batch: int, *, solo: bool) -> Any:
    """The worker's engine with the worker's defaults, ``batch`` sequences decoding together."""
    from workers.engine.adapter import Engine, EngineRequest

    b = BatchingConfig()
    eng = Engine(model, tokenizer, decode_capacity=max(fixed_capacity(b) or 0, batch), admission_batch=b.admission_batch,
                 prefill_step_size=b.prefill_step_size, solo_fast_path=solo)
    ids = tokenizer.encode(PROMPT)
    eng.insert([EngineRequest(f"s{i}", ids, MAX_TOKENS) for i in range(batch)])
    while eng.stats.last_batch_size < batch:  # prefill until all decode together
        eng.step()
    return eng


def _batch_generator(model: Any, tokenizer: Any, batch: int) -> Any:
    from mlx_lm.generate import BatchGenerator

    b = BatchingConfig()
    gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(set(tokenizer.eos_token_ids))],
                         completion_batch_size=max(fixed_capacity(b) or 0, batch), prefill_batch_size=b.admission_batch,
                         prefill_step_size=b.prefill_step_size)
    gen.insert([tokenizer.encode(PROMPT)] * batch, max_tokens=[MAX_TOKENS] * batch)
    while len(gen.next()[1]) < batch:
        pass
    return gen


def _generate_step(model: Any, tokenizer: Any) -> Any:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    gen = generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=MAX_TOKENS,
                        prefill_step_size=BatchingConfig().prefill_step_size)
    next(gen)
    return gen


def _timed_steps(step: Callable[[], Any], steps: int) -> float:
    """Median seconds of ``steps`` consecutive calls."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(model: Any, tokenizer: Any, sizes: list[int], steps: int, rounds: int) -> dict[str, Any]:
    """Per batch size: each system's median step time (ms), and the engine's mlx-lm/own split per step."""
    out: dict[str, Any] = {}
    for b in sizes:
        engine = _engine(model, tokenizer, b, solo=False)
        systems: dict[str, Callable[[], Any]] = {}
        closers: list[Callable[[], None]] = [engine.close]
        if b == 1:
            gs = _generate_step(model, tokenizer)
            systems["generate_step"] = lambda g=gs: next(g)
            closers.append(gs.close)
            solo = _engine(model, tokenizer, 1, solo=True)
            systems["engine (solo path)"] = solo.step
            closers.append(solo.close)
        gen = _batch_generator(model, tokenizer, b)
        systems["BatchGenerator"] = gen.next
        closers.append(gen.close)
        systems["engine (batch path)"] = engine.step
        medians: dict[str, list[float]] = {k: [] for k in systems}
        split = [0.0, 0.0, 0]  # the engine's mlx-lm seconds, own seconds, cycles, over its timed steps
        for r in range(rounds):
            keys = list(systems)
            for key in keys[r % len(keys):] + keys[: r % len(keys)]:
                systems[key]()  # one untimed step: the engine's cycle that spanned the other systems closes here
                s0 = (engine.stats.mlx_s, engine.stats.own_s, engine.stats.cycles)
                medians[key].append(_timed_steps(systems[key], steps))
                if key == "engine (batch path)":
                    split = [split[0] + engine.stats.mlx_s - s0[0], split[1] + engine.stats.own_s - s0[1],
                             split[2] + engine.stats.cycles - s0[2]]
        out[str(b)] = {
            "step_ms": {k: statistics.median(v) * 1000 for k, v in medians.items()},
            "rounds_ms": {k: [x * 1000 for x in v] for k, v in medians.items()},
            "engine_mlx_ms": split[0] / split[2] * 1000 if split[2] else 0.0,
            "engine_own_ms": split[1] / split[2] * 1000 if split[2] else 0.0,
        }
        for close in closers:
            close()
    return out


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def overlap(model: Any, tokenizer: Any, sizes: list[int], host_ms: list[float], steps: int, rounds: int) -> dict[str, Any]:
    """Per batch size and host work X: the median step cycle, and how much of X the step in flight hid."""
    out: dict[str, Any] = {}
    for b in sizes:
        engine = _engine(model, tokenizer, b, solo=b == 1)  # the path a lone request takes at batch 1
        cycles: dict[float, list[float]] = {x: [] for x in host_ms}
        for _ in range(rounds):
            for x in host_ms:
                cycles[x].append(_timed_steps(lambda x=x: (engine.step(), _busy_wait(x / 1000)), steps))
        engine.close()
        base = statistics.median(cycles[host_ms[0]]) * 1000
        rows = {}
        for x in host_ms:
            cycle = statistics.median(cycles[x]) * 1000
            added = x - host_ms[0]  # host work beyond the first setting (normally 0)
            hidden = added - (cycle - base)
            rows[str(x)] = {"cycle_ms": cycle, "hidden_ms": hidden, "hidden_pct": hidden / added * 100 if added else None}
        out[str(b)] = {"path": "solo" if b == 1 else "batch", "host_work": rows}
    return out


def compare_markdown(result: dict[str, Any]) -> str:
    """The side-by-side table: ms per step of each system, ratios, and the engine's split."""
    systems = ["generate_step", "engine (solo path)", "BatchGenerator", "engine (batch path)"]
    lines = ["| BLAS threads | batch | " + " | ".join(f"{s} ms/step" for s in systems)
             + " | engine batch / BatchGenerator | engine batch: mlx-lm ms | engine batch: own ms |",
             "|---|---|" + "---:|" * (len(systems) + 3)]
    for threads, by_size in result.items():
        for b, r in by_size.items():
            ms = r["step_ms"]
            cells = [f"{ms[s]:.2f}" if s in ms else "—" for s in systems]
            ratio = ms["engine (batch path)"] / ms["BatchGenerator"] if ms.get("BatchGenerator") else float("nan")
            lines.append(f"| {threads} | {b} | " + " | ".join(cells)
                         + f" | {ratio:.3f} | {r['engine_mlx_ms']:.2f} | {r['engine_own_ms']:.2f} |")
    return "\n".join(lines)


def overlap_markdown(result: dict[str, Any]) -> str:
    """Host work between steps against the step cycle it costs."""
    lines = ["| BLAS threads | batch | path | host work ms | step cycle ms | hidden ms | hidden % |",
             "|---|---|---|---:|---:|---:|---:|"]
    for threads, by_size in result.items():
        for b, r in by_size.items():
            for x, row in r["host_work"].items():
                pct = "—" if row["hidden_pct"] is None else f"{row['hidden_pct']:.0f}"
                lines.append(f"| {threads} | {b} | {r['path']} | {x} | {row['cycle_ms']:.2f} | "
                             f"{row['hidden_ms']:.2f} | {pct} |")
    return "\n".join(lines)
