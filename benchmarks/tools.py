"""A tool-calling conversation through the HTTP gateway on SmolLM2: a forced (grammar-constrained) call against free text.

Each client holds conversations of three requests, all with the same two tools offered, sent with
the fleet's client (the ``generate`` fields the HTTP gateway sends for the same chat request):

- ``constrained``: the question, ``tool_choice: required`` (the json_tools grammar forces a call);
- ``free``: the same question with ``tool_choice: auto`` (no grammar; SmolLM2 answers in text);
- ``answer``: the conversation with the call and its tool result, ``auto``: the final answer in text.

``constrained`` and ``free`` have the same prompt, so their decode speed compares the cost of
the grammar (llguidance's mask per step) at the same batch. Per request, from the worker's
timings: TTFT, and decode tok/s after the first token; per level: aggregate tok/s over all
kinds (per-request rates are the comparison). Levels 1 and 8 clients, one fleet for the whole run, kinds interleaved within
each conversation so the machine's drift reaches all of them.

    python -m benchmarks tools [--levels 1,8] [--conversations 3] [--max-tokens 64]
    python -m benchmarks --out /tmp/bench tools --quick      # smoke run: 1 and 2 clients, 1 conversation each
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from actors.config import BatchingConfig
from benchmarks.common import Report, add_out_argument, environment, progress, questions
from benchmarks.overhead import local_config
from mlx_fleet.client import AsyncClient, Client
from mlx_fleet.embedded import BackgroundFleet

KINDS = ("constrained", "free", "answer")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_web", "description": "Search the web for a question",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 80}},
                       "required": ["query"], "additionalProperties": False}}}]


async def one(client: AsyncClient, options: dict[str, Any]) -> dict[str, Any]:
    """One request through the fleet's client: the worker's own TTFT and decode tok/s, tokens, its tool calls.

    The worker's timings count every token, those of call markup too, which an HTTP stream shows
    only once a call's name is read: so the request goes over ZeroMQ, as the gateway sends it.
    """
    done = await client.generate(model="chat", **options)
    tokens = int(done.usage.get("completion_tokens", 0))
    decode_s = float(done.timings["total_s"]) - float(done.timings["ttft_s"])
    return {"ttft_s": float(done.timings["ttft_s"]), "tokens": tokens,
            "decode_tok_s": (tokens - 1) / decode_s if decode_s > 0 else 0.0, "calls": done.tool_calls or [],
            "finish_reason": done.finish_reason}


async def conversation(client: AsyncClient, question: str, max_tokens: int, out: dict[str, list[dict[str, Any]]]) -> None:
    """constrained, free and answer, one after the other."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    base = {"tools": TOOLS, "temperature": 0.7, "max_tokens": max_tokens}
    forced = await one(client, {**base, "messages": messages, "tool_choice": "required"})
    out["constrained"].append(forced)
    out["free"].append(await one(client, {**base, "messages": messages, "tool_choice": "auto"}))
    made = forced["calls"][:1] if _valid(forced["calls"][:1]) else []  # a call cut by max_tokens is not sent back
    call = (made or [{"id": "call_0", "name": "search_web", "arguments": '{"query": "weather"}'}])[0]
    history = [*messages, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"result": "sunny, 21 C"}'}]
    out["answer"].append(await one(client, {**base, "messages": history, "tool_choice": "auto"}))


async def level(frontend: str, clients: int, conversations: int, max_tokens: int, qs: list[str]) -> dict[str, Any]:
    """``clients`` clients, each holding ``conversations`` conversations in turn."""
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    client = AsyncClient(frontend, timeout_s=900.0)

    async def run(c: int) -> None:
        for i in range(conversations):
            q = qs[(c * conversations + i) % len(qs)]
            await conversation(client, f"{q} (client {c}, turn {i})", max_tokens, out)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(run(c) for c in range(clients)))
    finally:
        await client.close()
    wall_s = time.perf_counter() - t0
    summary: dict[str, Any] = {"wall_s": wall_s, "clients": clients}
    for kind, samples in out.items():
        rates = [s["decode_tok_s"] for s in samples if s["tokens"] > 1]
        summary[kind] = {"requests": len(samples), "tokens": sum(s["tokens"] for s in samples),
                         "decode_tok_s_median": statistics.median(rates) if rates else 0.0,
                         "decode_tok_s_mean": statistics.fmean(rates) if rates else 0.0,
                         "ttft_s_median": statistics.median(s["ttft_s"] for s in samples),
                         "valid_calls": sum(1 for s in samples if s["calls"] and _valid(s["calls"])),
                         "cut_by_max_tokens": sum(1 for s in samples if s["finish_reason"] == "length")}
    summary["aggregate_tok_s"] = sum(summary[k]["tokens"] for k in KINDS) / wall_s
    return summary


def _valid(calls: list[dict[str, str]]) -> bool:
    try:
        return bool(calls) and all(isinstance(json.loads(c["arguments"]), dict) and c["name"] for c in calls)
    except ValueError:
        return False


def table(results: dict[str, Any]) -> str:
    lines = ["| clients | kind | requests | tokens | decode tok/s per request (median) | TTFT p50 (s) | valid calls "
             "| cut by max_tokens |", "|---|---|---|---|---|---|---|---|"]
    for clients, r in results.items():
        for kind in KINDS:
            k = r[kind]
            lines.append(f"| {clients} | {kind} | {k['requests']} | {k['tokens']} | {k['decode_tok_s_median']:.1f} | "
                         f"{k['ttft_s_median']:.2f} | {k['valid_calls'] if kind == 'constrained' else '-'} | "
                         f"{k['cut_by_max_tokens']} |")
    lines += ["", "| clients | constrained / free decode tok/s | aggregate tok/s (all kinds) |", "|---|---|---|"]
    for clients, r in results.items():
        free = r["free"]["decode_tok_s_median"]
        ratio = r["constrained"]["decode_tok_s_median"] / free if free else float("nan")
        lines.append(f"| {clients} | {ratio:.2f} | {r['aggregate_tok_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write tools.json / tools.md."""
    p = argparse.ArgumentParser(prog="python -m benchmarks tools", description=__doc__.split("\n")[0])
    p.add_argument("--levels", default="1,8")
    p.add_argument("--conversations", type=int, default=3, help="conversations each client holds")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true")
    add_out_argument(p)
    args = p.parse_args(argv)
    levels = [1, 2] if args.quick else [int(x) for x in args.levels.split(",")]
    conversations = 1 if args.quick else args.conversations
    cfg, ipc_dir = local_config("chat", BatchingConfig(), source="smollm2")
    qs = questions()
    name = "tools_quick" if args.quick else "tools"
    params = {"levels": levels, "conversations_per_client": conversations, "max_tokens": args.max_tokens}
    with BackgroundFleet(cfg, ipc_dir) as fleet:
        with Client(fleet.cfg.frontend, timeout_s=30) as c:
            blas = c.status()["models"]["chat"]["workers"][0]["info"].get("blas", {})
        report = Report(name, "A tool-calling conversation: a grammar-forced call against free text (SmolLM2)",
                        environment(blas, "smollm2 (float32)"), params=params)
        asyncio.run(level(fleet.cfg.frontend, 1, 1, args.max_tokens, qs))  # warm-up: grammar compiler, token tables
        for clients in levels:
            progress(f"{clients} client(s)")
            report.results[str(clients)] = asyncio.run(level(fleet.cfg.frontend, clients, conversations,
                                                             args.max_tokens, qs))
    report.add_markdown(table(report.results))
    report.add_markdown("`constrained` and `free` share their prompt; `constrained` stops when its call closes. "
                        "Decode tok/s is per request, after its first token, from the worker's own timings "
                        "(`done.timings`: every token counted, call markup included); TTFT likewise.")
    paths = report.write(args.out)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
