"""GGUF conversion and the built-in models' speed per precision, on this device.

- **Conversion**: each built-in model's GGUF (SmolLM2 Q4_1, read by ``mx.load``; Gemma 3
  270M Q4_K_M, dequantized tensor by tensor with ``gguf.quants``) converted to each
  precision in a fresh interpreter, into a throw-away cache: wall time, and the
  interpreter's peak resident memory (``ru_maxrss``), with the GGUF's size and the
  written folder's beside them.
- **Speed per precision**: in this process, one stream at a time, greedy, the same
  prompts at each precision, rounds interleaved: mlx-lm's own prompt and generation
  tok/s.
- **Answers**: the greedy answers of each model to a few prompts, at float32.

    python -m benchmarks gguf [--models smollm2,gemma3] [--precisions float32,quantized,bfloat16] [--rounds 2]
    python -m benchmarks --out /tmp/bench gguf --quick     # smoke run: smollm2 only, one round, 8 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from workers.blas import describe_blas, find_blas, preload_blas

BLAS = preload_blas(find_blas("auto"))  # before anything imports mlx

from benchmarks.common import Report, add_out_argument, environment, progress  # noqa: E402

# (prompt, chat?) per model: Gemma 3 270M is the pre-trained model (no chat template).
PROMPTS: dict[str, list[tuple[str, bool]]] = {
    "smollm2": [("What is the capital of France?", True), ("Write a haiku about the sea.", True),
                ("Name three primary colors.", True)],
    "gemma3": [("The capital of France is", False), ("def fibonacci(n):", False),
               ("The three primary colors are", False)],
}

_CONVERT = """
import json, resource, sys, time
from pathlib import Path
from workers.blas import find_blas, preload_blas
preload_blas(find_blas("auto"))
from workers.models.builtin import builtin_gguf
from workers.models.builtins import find_builtin
from workers.models.gguf import ensure_converted
src = builtin_gguf(find_builtin(sys.argv[1]))
t0 = time.monotonic()
folder = ensure_converted(src, sys.argv[2], root=Path(sys.argv[3]), progress=lambda _t: None)
wall = time.monotonic() - t0
size = sum(f.stat().st_size for f in folder.iterdir())
print(json.dumps({"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "gguf_mib": src.stat().st_size / 2**20, "folder_mib": size / 2**20}))
"""


def conversion(model: str, precision: str) -> dict[str, float]:
    """Convert one built-in model at one precision in a fresh interpreter; its time and peak memory."""
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as cache:
        done = subprocess.run([sys.executable, "-c", _CONVERT, model, precision, cache], capture_output=True,
                              text=True, check=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def speeds(model: str, names: list[str], rounds: int, max_tokens: int,
           prompts: list[tuple[str, bool]] | None = None) -> dict[str, dict[str, list[float]]]:
    """Prompt and generation tok/s of in-process mlx-lm at each precision, ``rounds`` interleaved rounds.

    ``prompts`` are (text, as a chat message) pairs, by default the model's :data:`PROMPTS`.
    """
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    from workers.models.sources import resolve_source

    loaded: dict[str, tuple[Any, Any]] = {name: load(str(resolve_source(model, name, progress=progress)))[:2]
                                          for name in names}
    out: dict[str, dict[str, list[float]]] = {name: {"prompt_tps": [], "generation_tps": []} for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            m, tokenizer = loaded[name]
            for text, chat in prompts or PROMPTS[model]:
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                       add_generation_prompt=True) if chat else text
                last = None
                for last in stream_generate(m, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
                    pass
                if last is not None:
                    out[name]["prompt_tps"].append(last.prompt_tps)
                    out[name]["generation_tps"].append(last.generation_tps)
            progress(f"{model} round {r + 1}/{rounds}: {name} done")
    loaded.clear()
    mx.clear_cache()
    return out


def answers(model: str, max_tokens: int) -> list[dict[str, str]]:
    """Greedy answers at float32."""
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    from workers.models.sources import resolve_source

    loaded: tuple[Any, Any] = load(str(resolve_source(model, "float32", progress=progress)))[:2]
    m, tokenizer = loaded
    out = []
    for text, chat in PROMPTS[model]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True) if chat else text
        out.append({"prompt": text, "answer": generate(m, tokenizer, prompt, max_tokens=max_tokens,
                                                       sampler=make_sampler(temp=0.0))})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The three tables."""
    lines = ["## Conversion (fresh interpreter each)", "",
             "| model | precision | wall s | peak RSS MiB | GGUF MiB | folder MiB |", "|---|---|---:|---:|---:|---:|"]
    for (model, precision), c in ((tuple(k.split("/")), v) for k, v in result["conversion"].items()):
        lines.append(f"| {model} | {precision} | {c['wall_s']:.1f} | {c['peak_rss_mib']:.0f} | {c['gguf_mib']:.0f} "
                     f"| {c['folder_mib']:.0f} |")
    lines += ["", "## Speed per precision (in-process mlx-lm, one stream, greedy)", "",
              "| model | precision | generation tok/s (median, range) | prompt tok/s (median, range) |",
              "|---|---|---:|---:|"]
    for model, per in result["speed"].items():
        for name, r in per.items():
            cells = [f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})" if v else "—"
                     for v in (r["generation_tps"], r["prompt_tps"])]
            lines.append(f"| {model} | {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Answers (float32, greedy)", ""]
    for model, rows in result["answers"].items():
        for row in rows:
            lines.append(f"- {model}, {row['prompt']!r}: {row['answer']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three parts and write <out>/<name>.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--precisions", default="float32,quantized,bfloat16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--name", default="gguf")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a result): smollm2, one round, 8 tokens")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.precisions, args.rounds, args.max_tokens = "smollm2", "float32,quantized", 1, 8
        args.name += "_quick"
    models, names = args.models.split(","), args.precisions.split(",")
    result: dict[str, Any] = {"conversion": {}, "speed": {}, "answers": {}}
    for model in models:
        for name in names:
            progress(f"converting {model} to {name}")
            result["conversion"][f"{model}/{name}"] = conversion(model, name)
    for model in models:
        result["speed"][model] = speeds(model, names, args.rounds, args.max_tokens)
        result["answers"][model] = answers(model, args.max_tokens)
    report = Report(args.name, "GGUF conversion and speed per precision", environment(describe_blas(), args.models),
                    params={"models": args.models, "precisions": args.precisions, "rounds": args.rounds,
                            "max_tokens": args.max_tokens}, results=result)
    report.add_markdown(markdown(result))
    report.write(args.out)
    return result
