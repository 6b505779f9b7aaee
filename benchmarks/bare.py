"""The bare engine: mlx-lm in this process, no sockets, measured like a client would.

- :func:`run_sequential`: one request after another through ``mlx_lm.stream_generate``
  (:func:`benchmarks.overhead.run_in_process`), the equivalent of one client.
- :func:`run_batched`: mlx-lm's ``BatchGenerator`` driven directly with ``clients``
  sequences in flight; when one finishes the next question is inserted at once. That
  closed loop is the equivalent of ``clients`` clients sending back to back, with
  no transport at all.

Both return a :class:`benchmarks.load.LoadRun`, so every system shares one metric code
path; ``run_batched``'s also carries the figures a fleet's run reports from its workers
(steps, mean batch, time inside ``BatchGenerator.next`` and around it, CPU), so the two
sit side by side. Call them from the thread that loaded the model: MLX arrays belong to a thread.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from benchmarks.fleet_probe import cpu_seconds, summarize
from benchmarks.load import LoadRun, RequestSample


def encode(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids as ``stream_generate`` makes them (no second BOS when the text has one)."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))


def run_sequential(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> LoadRun:
    """Every prompt in turn through ``mlx_lm.stream_generate``, greedy."""
    from benchmarks.overhead import run_in_process

    samples: list[RequestSample] = []
    t0 = time.perf_counter()
    for prompt in prompts:
        started = time.perf_counter()
        try:
            s = run_in_process(model, tokenizer, prompt, max_tokens)
            samples.append(RequestSample(s.ttft_s, s.total_s, s.tokens, started_s=started))
        except Exception as exc:  # recorded as a failed request, as run_load does
            samples.append(RequestSample(0.0, time.perf_counter() - started, 0, ok=False,
                                         error=f"{type(exc).__name__}: {exc}"[:200], started_s=started))
    return LoadRun(1, time.perf_counter() - t0, samples)


@dataclass
class _InFlight:
    """One sequence in the batch, from insertion (its client's send) on."""

    started_s: float
    ttft_s: float = 0.0
    tokens: int = 0


def make_batch_generator(model: Any, tokenizer: Any, clients: int) -> Any:
    """mlx-lm's ``BatchGenerator`` for ``clients`` sequences, prefilling up to ``clients`` at once."""
    from mlx_lm.generate import BatchGenerator

    return BatchGenerator(model, stop_tokens=[[t] for t in sorted(set(tokenizer.eos_token_ids))],
                          completion_batch_size=clients, prefill_batch_size=clients)


def run_batched(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int, clients: int, *,
                gen: Any = None) -> LoadRun:
    """A closed loop of ``clients`` sequences in one ``BatchGenerator``, greedy.

    ``gen`` (from :func:`make_batch_generator`) is reused and left open, as a server keeps
    its generator; without it one is made and closed here.
    """
    eos = set(tokenizer.eos_token_ids)
    own = gen is None
    if own:
        gen = make_batch_generator(model, tokenizer, clients)
    waiting = deque(prompts)
    live: dict[int, _InFlight] = {}
    samples: list[RequestSample] = []

    def admit(n: int) -> None:
        # A client sends as soon as its previous answer is complete: start the clock, then tokenize.
        batch = [waiting.popleft() for _ in range(min(n, len(waiting)))]
        if not batch:
            return
        started = time.perf_counter()
        uids = gen.insert([encode(tokenizer, p) for p in batch], max_tokens=[max_tokens] * len(batch))
        for uid in uids:
            live[uid] = _InFlight(started)

    t0, cpu0 = time.perf_counter(), cpu_seconds(os.getpid())
    inside_s, steps, decode_steps, tokens = 0.0, 0, 0, 0
    try:
        admit(clients)
        while live:
            t_step = time.perf_counter()
            _, responses = gen.next()
            now = time.perf_counter()
            inside_s += now - t_step
            steps += 1
            decode_steps += bool(responses)
            tokens += len(responses)
            done = 0
            for r in responses:
                seq = live.get(r.uid)
                if seq is None:
                    continue
                if not seq.ttft_s:
                    seq.ttft_s = now - seq.started_s
                seq.tokens += not (r.finish_reason == "stop" and r.token in eos)
                if r.finish_reason is not None:
                    samples.append(RequestSample(seq.ttft_s, now - seq.started_s, seq.tokens, started_s=seq.started_s))
                    del live[r.uid]
                    done += 1
            admit(done)
    finally:
        if own:
            gen.close()
    wall_s, cpu1 = time.perf_counter() - t0, cpu_seconds(os.getpid())
    engine = summarize({"steps": steps, "decode_steps": decode_steps, "generated_tokens": tokens, "batch_steps": decode_steps,
                        "requests_batch": len(samples), "mlx_s": inside_s, "own_s": wall_s - inside_s},
                       {"worker": None if cpu0 is None or cpu1 is None else cpu1 - cpu0, "broker": None, "client": None})
    return LoadRun(clients, wall_s, samples, engine)
