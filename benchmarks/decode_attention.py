"""Decode steps with MLX's attention against the worker's grouped decode attention, on the CPU.

For each batch size the model's forward pass of one decode step (one token per sequence,
``--contexts`` tokens already cached, left-padded as mlx-lm's ``BatchGenerator`` pads)
runs with mlx-lm's attention function (``mx.fast.scaled_dot_product_attention``) and with
:class:`workers.engine.attention.GroupedDecodeAttention`, alternating step by step so drift
in the machine falls on both. Reported: the median step time of each, their ratio, the
largest difference in the logits and whether every next token (argmax) is the same.

    python -m benchmarks decode-attention [--model smollm2] [--batches 1,8,32] [--steps 40]
    python -m benchmarks --quick decode-attention      # smoke run (not a result): demo model
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from workers.blas import describe_blas, find_blas, preload_blas

preload_blas(find_blas("auto"))

import mlx.core as mx  # noqa: E402
from mlx_lm.models import base  # noqa: E402
from mlx_lm.models.cache import BatchKVCache  # noqa: E402

from benchmarks.common import Report, add_out_argument, environment, progress  # noqa: E402
from workers.engine import attention  # noqa: E402
from workers.models.precision import load_model  # noqa: E402
from workers.models.sources import resolve_source  # noqa: E402

VARIANTS = ("mlx", "grouped")


def measure(model: Any, batch: int, context: int, steps: int) -> dict[str, Any]:
    """Median step time of each variant at ``batch`` sequences, and how far their logits differ."""
    module = sys.modules[type(model).__module__]
    functions = {"mlx": base.scaled_dot_product_attention,
                 "grouped": attention.GroupedDecodeAttention(base.scaled_dot_product_attention)}
    padding = [i % 7 for i in range(batch)]  # sequences of different lengths, as in a real batch
    caches = [BatchKVCache(padding) for _ in model.layers]
    mx.eval(model(mx.array([[1 + i % 50] * context for i in range(batch)]), cache=caches))
    nxt = mx.array([[2]] * batch)

    def step(variant: str) -> tuple[float, mx.array]:
        setattr(module, attention.ATTENTION_NAME, functions[variant])
        for c in caches:  # every step sees the same context
            c._idx, c.offset = context, c.offset * 0 + context - mx.array(padding)
        t0 = time.perf_counter()
        logits = model(nxt, cache=caches)
        mx.eval(logits)
        return time.perf_counter() - t0, logits

    original = getattr(module, attention.ATTENTION_NAME)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for i in range(steps + 3):
            for v in VARIANTS if i % 2 else VARIANTS[::-1]:
                dt, _ = step(v)
                if i >= 3:  # the first rounds warm up
                    times[v].append(dt)
        a, b = step("mlx")[1], step("grouped")[1]
    finally:
        setattr(module, attention.ATTENTION_NAME, original)
    med = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    return {"batch": batch, "mlx_ms": med["mlx"] * 1e3, "grouped_ms": med["grouped"] * 1e3,
            "ratio": med["grouped"] / med["mlx"], "max_logit_diff": mx.abs(a - b).max().item(),
            "same_next_tokens": bool(mx.all(a.argmax(-1) == b.argmax(-1)).item())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure each batch size and write ``decode_attention.{json,md}``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="100,500", help="tokens cached per sequence")
    ap.add_argument("--steps", type=int, default=40, help="timed steps of each variant per batch size")
    ap.add_argument("--name", default="decode_attention")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): demo model, few steps")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.batches, args.contexts, args.steps, args.name = "demo", "1,4", "100", 3, args.name + "_quick"
    model, _ = load_model(str(resolve_source(args.model)))
    cfg = model.args
    rows = []
    for context in (int(x) for x in args.contexts.split(",")):
        for b in (int(x) for x in args.batches.split(",")):
            progress(f"{context} tokens cached, batch {b}")
            rows.append({"context": context, **measure(model, b, context, args.steps)})
    shape = {"heads": cfg.num_attention_heads, "kv_heads": getattr(cfg, "num_key_value_heads", None),
             "head_size": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads}
    report = Report(args.name, f"Decode attention on the CPU: MLX's against grouped by KV head ({args.model})",
                    environment(describe_blas(), args.model),
                    {**{k: v for k, v in vars(args).items() if k not in ("out", "quick", "name")}, **shape,
                     "device": str(mx.default_device())},
                    {"rows": rows})
    lines = ["| tokens cached | batch | MLX's attention (ms/step) | grouped (ms/step) | grouped / MLX's | largest logit difference "
             "| same next tokens |", "|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['context']} | {r['batch']} | {r['mlx_ms']:.1f} | {r['grouped_ms']:.1f} | {r['ratio']:.3f} | {r['max_logit_diff']:.2g} "
              f"| {'yes' if r['same_next_tokens'] else 'no'} |" for r in rows]
    report.add_markdown(f"One decode step's forward pass (tokens cached per sequence as shown, left-padded by 0-6), "
                        f"median of {args.steps} steps of each, alternating.\n\n" + "\n".join(lines))
    report.publish(args.out)
    return report.results


if __name__ == "__main__":
    main()
