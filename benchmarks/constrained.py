"""Decoding controls at batch speed: constrained against unconstrained decoding, and the cost of one
controlled row to its neighbours.

Runs the worker's own ``Engine`` in process (no sockets), one fresh process per model, with
the worker's BLAS. Every figure is a median over interleaved rounds, each round measuring
every variant one after another, so the ratios are side by side in one run.

- ``grammar``: for batch 1, 8 and 16, B sequences of one prompt decode with no control, and
  then each under a JSON Schema (an array of at least 100 small objects, so no row can end
  inside the measured steps; llguidance fills the masks while the forward pass runs). Reports
  tok/s of each, their ratio, and the mask fill's share of a constrained step (time spent
  consuming tokens and filling masks, from the engine's ``mask_s``, over the step time).
- ``neighbours``: a batch of 16 plain rows, against 15 plain rows beside one penalised row
  (frequency and presence penalty, a logit bias) and beside one logprobs row (top 5): the 15
  plain rows' tok/s in each (all rows step together, so a row's rate is 1 / step time).

    python -m benchmarks constrained [--models smollm2,demo-wide] [--steps 30] [--rounds 3] [--quick] [--out DIR]

The targets: constrained ≥ 0.9× unconstrained at batch 8 on SmolLM2; the plain rows beside
a penalised or logprobs row within 5% of a batch without it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Report, add_out_argument, environment, progress

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "List the people you met today, as JSON."
SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}}
WARMUP_STEPS = 3


def _time_steps(engine: Any, steps: int) -> list[float]:
    """Seconds of each of ``steps`` engine steps (after a few unmeasured ones)."""
    for _ in range(WARMUP_STEPS):
        engine.step()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        out.append(time.perf_counter() - t0)
    return out


def _run(model: Any, tokenizer: Any, reqs: list[Any], steps: int) -> dict[str, float]:
    """Insert ``reqs`` into a fresh engine, decode until they all step together, time ``steps`` steps."""
    from workers.engine.adapter import Engine

    engine = Engine(model, tokenizer, decode_capacity=16, admission_batch=16, prompt_cache_entries=0)
    engine.insert(reqs)
    while engine.stats.last_batch_size < len(reqs):
        engine.step()
    mask_s0 = engine.stats.mask_s
    times = _time_steps(engine, steps)
    step_s = statistics.median(times)
    mask_s = (engine.stats.mask_s - mask_s0) / (steps + WARMUP_STEPS)
    assert engine.stats.last_batch_size == len(reqs), "a row ended inside the measured steps"
    engine.close()
    return {"step_s": step_s, "mask_s": mask_s}


def measure(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both parts on one model, in this process."""
    from workers.blas import describe_blas, find_blas, preload_blas

    preload_blas(find_blas("auto"))
    from workers.engine.adapter import Engine
    from workers.engine.interface import Controls, EngineRequest
    from workers.models.precision import load_model
    from workers.models.sources import resolve_source

    model, tokenizer = load_model(str(resolve_source(model_name)))
    prompt = list(tokenizer.encode(PROMPT))
    grammar = Engine(model, tokenizer).compile_grammar({"type": "json_schema", "schema": SCHEMA})
    many = 10_000

    def rows(b: int, controls: Controls | None = None, plain: int = 0) -> list[Any]:
        return ([EngineRequest(f"p{i}", prompt, many) for i in range(plain)]
                + [EngineRequest(f"c{i}", prompt, many, controls=controls) for i in range(b)])

    variants: dict[str, list[Any]] = {}
    for b in args.batch_sizes:
        variants[f"plain-{b}"] = rows(b)
        variants[f"grammar-{b}"] = rows(b, Controls(grammar=grammar))
    variants["neighbours-plain"] = rows(0, plain=16)
    variants["neighbours-penalised"] = rows(1, Controls(frequency_penalty=0.5, presence_penalty=0.5,
                                                        logit_bias={5: -100.0, 6: 2.0}), plain=15)
    variants["neighbours-logprobs"] = rows(1, Controls(logprobs=True, top_logprobs=5), plain=15)
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, reqs in variants.items():
            progress(f"constrained: {model_name} round {r + 1}/{args.rounds} {name}")
            samples[name].append(_run(model, tokenizer, reqs, args.steps))
    return {"blas": describe_blas(), "vocab_size": int(model.args.vocab_size),
            "variants": {k: {"step_s": statistics.median(s["step_s"] for s in v),
                             "mask_s": statistics.median(s["mask_s"] for s in v),
                             "rounds_step_s": [s["step_s"] for s in v]} for k, v in samples.items()}}


def summarize(result: dict[str, Any], batch_sizes: list[int]) -> dict[str, Any]:
    """tok/s, ratios and shares from the step times."""
    v = result["variants"]
    grammar = {}
    for b in batch_sizes:
        plain, con = v[f"plain-{b}"], v[f"grammar-{b}"]
        grammar[b] = {"plain_tok_s": b / plain["step_s"], "grammar_tok_s": b / con["step_s"],
                      "ratio": plain["step_s"] / con["step_s"], "mask_share": con["mask_s"] / con["step_s"],
                      "mask_ms_per_step": con["mask_s"] * 1000}
    base = v["neighbours-plain"]["step_s"]
    neighbours = {k: {"plain_rows_tok_s_each": 1 / v[f"neighbours-{k}"]["step_s"],
                      "ratio_to_plain_batch": base / v[f"neighbours-{k}"]["step_s"]}
                  for k in ("plain", "penalised", "logprobs")}
    return {"grammar": grammar, "neighbours": neighbours}


def markdown(results: dict[str, Any]) -> str:
    """The report's tables."""
    lines = ["## Constrained (JSON Schema) against unconstrained decoding", "",
             "| model | vocab | batch | plain tok/s | constrained tok/s | ratio | mask fill ms/step | mask share of step |",
             "|---|---|---|---|---|---|---|---|"]
    for model, r in results.items():
        for b, g in r["summary"]["grammar"].items():
            lines.append(f"| {model} | {r['vocab_size']} | {b} | {g['plain_tok_s']:.1f} | {g['grammar_tok_s']:.1f} | "
                         f"{g['ratio']:.3f} | {g['mask_ms_per_step']:.2f} | {g['mask_share'] * 100:.1f}% |")
    lines += ["", "## One controlled row in a batch of 16: the other rows", "",
              "Each plain row's tok/s (all rows step together), and its ratio to a batch of 16 plain rows.", "",
              "| model | batch | plain rows' tok/s each | ratio |", "|---|---|---|---|"]
    for model, r in results.items():
        for k, n in r["summary"]["neighbours"].items():
            what = {"plain": "16 plain", "penalised": "15 plain + 1 penalised", "logprobs": "15 plain + 1 logprobs"}[k]
            lines.append(f"| {model} | {what} | {n['plain_rows_tok_s_each']:.2f} | {n['ratio_to_plain_batch']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run ``measure`` once per model, each in a fresh process."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="smollm2,demo-wide")
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="constrained")
    ap.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): demo, batches 1 and 8, 3 steps")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.steps, args.rounds = "demo", "1,8", 3, 1
        args.name += "_quick"
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    results: dict[str, Any] = {}
    for model in args.models.split(","):
        child = [sys.executable, "-m", "benchmarks.constrained", "--child", model, "--steps", str(args.steps),
                 "--rounds", str(args.rounds), "--batch-sizes", ",".join(map(str, args.batch_sizes))]
        proc = subprocess.run(child, capture_output=True, text=True, timeout=3600, cwd=REPO_ROOT)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        results[model] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[model]["summary"] = summarize(results[model], args.batch_sizes)
    blas = next(iter(results.values()))["blas"]
    report = Report(args.name, "Decoding controls at batch speed (in process)", environment(blas, args.models),
                    {"steps": args.steps, "rounds": args.rounds, "batch_sizes": args.batch_sizes,
                     "schema": json.dumps(SCHEMA)})
    report.results = results
    report.add_markdown(markdown(results))
    _, md = report.write(args.out)
    print(md.read_text())


if __name__ == "__main__":
    main()
