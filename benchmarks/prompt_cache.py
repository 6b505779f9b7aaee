"""Multi-turn chat with and without the workers' prompt cache, and against mlx_lm.server.

Each of ``--conversations`` conversations (run concurrently) shares one system prompt of
about ``--system-tokens`` tokens and asks ``--turns`` questions, resending the whole
conversation every turn. Three runs of the same workload, one after the other:

- ``fleet, cache off``: one mlx-fleet worker; every request says ``cache: false``.
- ``fleet, cache on``: the same fleet; requests carry an ``affinity`` key per conversation.
- ``mlx_lm.server``: ``python -m mlx_lm.server`` on the same model folder, with its own
  prompt cache, driven through streaming ``/v1/chat/completions``.

TTFT is measured at the client: from sending a turn to its first streamed token. "Warm"
turns are turns 2..N; the target is warm-turn TTFT p50 with the cache at most 0.25x the
same turns without it ("cold"), and no worse than mlx_lm.server's.

    python benchmarks/prompt_cache.py            # demo-small, 8 x 5 turns, ~400-token system prompt
    python benchmarks/prompt_cache.py --quick    # smoke run: tiny model, 2 x 2 turns (not a result)

Writes ``<out>/prompt_cache.{json,md}`` (``prompt_cache_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from actors.config import BatchingConfig  # noqa: E402  (needs the sys.path line above)
from actors.stats import percentile  # noqa: E402
from benchmarks.common import env_markdown, environment, results_dir  # noqa: E402
from benchmarks.overhead import local_config  # noqa: E402
from mlx_fleet.client import Client  # noqa: E402
from mlx_fleet.embedded import BackgroundFleet  # noqa: E402
from workers.blas import blas_env, find_blas  # noqa: E402
from workers.models.demo_model import ensure_demo_model  # noqa: E402

CORPUS = REPO_ROOT / "workers" / "data" / "corpus.txt"
QUESTIONS = [
    "How should a queue treat a request that has waited a long time?",
    "What changes when a second worker joins the fleet?",
    "Why does batching help throughput but sometimes hurt latency?",
    "What should happen to requests when a worker dies?",
    "How would you explain backpressure to a new engineer?",
]
SERVER_READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Workload:
    """What every run sends: the same prompts, in the same order."""

    system_prompt: str
    system_tokens: int
    conversations: int
    turns: int
    max_tokens: int

    def question(self, conversation: int, turn: int) -> str:
        return f"(Reader {conversation}) {QUESTIONS[turn % len(QUESTIONS)]}"


@dataclass
class TurnResult:
    """One turn as the client saw it."""

    conversation: int
    turn: int
    ttft_s: float
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    text: str = field(repr=False, default="")


class Session(Protocol):
    def ask(self, messages: list[dict[str, str]], conversation: int) -> TurnResult: ...

    def close(self) -> None: ...


def make_system_prompt(folder: Path, n_tokens: int) -> tuple[str, int]:
    """The first ``n_tokens`` tokens of the bundled corpus, as text, and its token count."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(CORPUS.read_text(), add_special_tokens=False).ids[:n_tokens]
    text = tok.decode(ids)
    return text, len(tok.encode(text, add_special_tokens=False).ids)


def run_conversations(work: Workload, open_session: Callable[[], Session]) -> tuple[list[TurnResult], float]:
    """All conversations at once, one thread and session each; returns turns and wall time."""
    results: list[TurnResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(work.conversations + 1)

    def converse(c: int) -> None:
        session = open_session()
        try:
            messages = [{"role": "system", "content": work.system_prompt}]
            start.wait()
            for t in range(work.turns):
                messages.append({"role": "user", "content": work.question(c, t)})
                r = session.ask(messages, c)
                r.turn = t
                messages.append({"role": "assistant", "content": r.text})
                with lock:
                    results.append(r)
        except BaseException as exc:  # reported after the join
            errors.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=converse, args=(c,), daemon=True) for c in range(work.conversations)]
    for th in threads:
        th.start()
    start.wait(timeout=60)
    t0 = time.perf_counter()
    for th in threads:
        th.join(REQUEST_TIMEOUT_S * work.turns)
    wall_s = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} conversations failed; first: {errors[0]!r}") from errors[0]
    return results, wall_s


class FleetSession:
    """One conversation over the mlx-fleet client, streaming."""

    def __init__(self, frontend: str, model: str, *, cache: bool, max_tokens: int) -> None:
        self.client = Client(frontend, timeout_s=REQUEST_TIMEOUT_S)
        self.model, self.cache, self.max_tokens = model, cache, max_tokens

    def ask(self, messages: list[dict[str, str]], conversation: int) -> TurnResult:
        t0 = time.perf_counter()
        ttft_s = 0.0
        stream = self.client.stream(model=self.model, messages=messages, max_tokens=self.max_tokens,
                                    cache=self.cache, affinity=f"conversation-{conversation}")
        for chunk in stream:
            if not ttft_s and chunk.token_ids:
                ttft_s = time.perf_counter() - t0
        total_s = time.perf_counter() - t0
        done = stream.completion
        assert done is not None
        u = done.usage
        return TurnResult(conversation, 0, ttft_s or total_s, total_s, u["prompt_tokens"], u["completion_tokens"],
                          u.get("cached_tokens", 0), done.text)

    def close(self) -> None:
        self.client.close()


class ServerSession:
    """One conversation over mlx_lm.server's OpenAI API, streaming."""

    def __init__(self, port: int, model: str, *, max_tokens: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        self.model, self.max_tokens = model, max_tokens

    def ask(self, messages: list[dict[str, str]], conversation: int) -> TurnResult:
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        ttft_s = 0.0
        self.conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"mlx_lm.server answered {resp.status}: {resp.read()[:200]!r}")
        parts: list[str] = []
        usage: dict[str, Any] = {}
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and not ttft_s:
                    ttft_s = time.perf_counter() - t0
                parts.append(piece)
        total_s = time.perf_counter() - t0
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return TurnResult(conversation, 0, ttft_s or total_s, total_s, usage.get("prompt_tokens", 0),
                          usage.get("completion_tokens", 0), cached, "".join(parts))

    def close(self) -> None:
        self.conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlx_server(folder: Path, port: int, batching: BatchingConfig, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m mlx_lm.server`` with the fleet's BLAS and cache bounds; returns once healthy."""
    env = {**os.environ, **blas_env(find_blas(os.environ.get("MLX_FLEET_BLAS", "auto")))}
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port),
           "--prompt-cache-size", str(batching.prompt_cache_entries),
           "--prompt-cache-bytes", str(batching.prompt_cache_bytes), "--log-level", "WARNING"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited with {proc.returncode}; see {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return proc
            conn.close()
        except OSError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"mlx_lm.server not healthy after {SERVER_READY_TIMEOUT_S:.0f}s; see {log_path}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """terminate, wait, then kill."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def summarize(name: str, turns: list[TurnResult], wall_s: float) -> dict[str, Any]:
    """TTFT percentiles (all, turn 1, warm turns) and aggregate throughput of one run."""
    def pct(rows: list[TurnResult], q: float) -> float | None:
        return round(percentile([r.ttft_s for r in rows], q), 4) if rows else None

    first = [r for r in turns if r.turn == 0]
    warm = [r for r in turns if r.turn > 0]
    completion = sum(r.completion_tokens for r in turns)
    prompt = sum(r.prompt_tokens for r in turns)
    return {
        "name": name, "turns": len(turns), "wall_s": round(wall_s, 3),
        "ttft_p50_s": pct(turns, 50), "ttft_p99_s": pct(turns, 99),
        "first_turn_ttft_p50_s": pct(first, 50), "first_turn_ttft_p99_s": pct(first, 99),
        "warm_ttft_p50_s": pct(warm, 50), "warm_ttft_p99_s": pct(warm, 99),
        "completion_tokens": completion, "prompt_tokens": prompt,
        "cached_tokens": sum(r.cached_tokens for r in turns),
        "warm_turns_with_hits": sum(1 for r in warm if r.cached_tokens > 0), "warm_turns": len(warm),
        "tok_per_s": round(completion / wall_s, 2) if wall_s > 0 else None,
        "per_turn": [{k: v for k, v in dataclasses.asdict(r).items() if k != "text"}
                     for r in sorted(turns, key=lambda r: (r.conversation, r.turn))],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def warm_up(session: Session) -> None:
    """One unrelated request, so load and first-call costs stay out of the measurements."""
    session.ask([{"role": "user", "content": "Warm-up: say anything."}], -1)
    session.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = ensure_demo_model(args.model)
    system, system_tokens = make_system_prompt(folder, args.system_tokens)
    work = Workload(system, system_tokens, args.conversations, args.turns, args.max_tokens)
    batching = BatchingConfig()
    runs: list[dict[str, Any]] = []
    cfg, ipc_dir = local_config(args.model, batching)
    with BackgroundFleet(cfg, ipc_dir) as fleet:
        def fleet_session(cache: bool) -> Callable[[], Session]:
            return lambda: FleetSession(fleet.cfg.frontend, args.model, cache=cache, max_tokens=args.max_tokens)

        warm_up(fleet_session(False)())
        for name, cache in (("fleet, cache off", False), ("fleet, cache on", True)):
            print(f"running: {name}", flush=True)
            runs.append(summarize(name, *run_conversations(work, fleet_session(cache))))
    if not args.skip_server:
        port = free_port()
        print("running: mlx_lm.server", flush=True)
        proc = start_mlx_server(folder, port, batching, Path(args.server_log))
        try:
            def server_session() -> Session:
                return ServerSession(port, str(folder), max_tokens=args.max_tokens)

            warm_up(server_session())
            runs.append(summarize("mlx_lm.server", *run_conversations(work, server_session)))
        finally:
            stop_process(proc)
    off, on = runs[0], runs[1]
    server = runs[2] if len(runs) > 2 else None
    return {
        "benchmark": "prompt_cache", "quick": args.quick, "model": args.model,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        # The BLAS the workers and mlx_lm.server load (this process runs no model).
        "env": environment(dataclasses.asdict(find_blas(os.environ.get("MLX_FLEET_BLAS", "auto"))), f"{args.model} ({folder})"),
        "workload": {"conversations": work.conversations, "turns": work.turns, "max_tokens": work.max_tokens,
                     "system_tokens": work.system_tokens},
        "prompt_cache": {"entries": batching.prompt_cache_entries, "bytes": batching.prompt_cache_bytes},
        "runs": runs,
        "warm_over_cold_p50": ratio(on["warm_ttft_p50_s"], off["warm_ttft_p50_s"]),
        "warm_over_first_turn_p50": ratio(on["warm_ttft_p50_s"], on["first_turn_ttft_p50_s"]),
        "warm_over_server_p50": ratio(on["warm_ttft_p50_s"], server["warm_ttft_p50_s"]) if server else None,
        "target_warm_over_cold_p50": 0.25,
    }


def _ms(value_s: float | None) -> str:
    return "–" if value_s is None else f"{value_s * 1000:.0f}"


def to_markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown table plus the target checks."""
    w = result["workload"]
    ms = _ms
    lines = [
        f"# Prompt cache: multi-turn chat on `{result['model']}`" + (" (quick smoke run, not a result)" if result["quick"] else ""),
        "",
        f"{w['conversations']} concurrent conversations × {w['turns']} turns, a shared system prompt of "
        f"{w['system_tokens']} tokens, up to {w['max_tokens']} new tokens per turn, greedy. TTFT is measured "
        f"at the client, to the first streamed token. Warm turns are turns 2..{w['turns']}. "
        f"Prompt cache bounds: {result['prompt_cache']['entries']} entries, "
        f"{result['prompt_cache']['bytes'] / 2**20:.0f} MiB (mlx_lm.server given the same).",
        "",
        "| run | TTFT p50 ms | TTFT p99 ms | turn-1 p50 ms | warm p50 ms | warm p99 ms | warm turns with hits | cached / prompt tokens | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['name']} | {ms(r['ttft_p50_s'])} | {ms(r['ttft_p99_s'])} | {ms(r['first_turn_ttft_p50_s'])} | "
            f"{ms(r['warm_ttft_p50_s'])} | {ms(r['warm_ttft_p99_s'])} | {r['warm_turns_with_hits']}/{r['warm_turns']} | "
            f"{r['cached_tokens']}/{r['prompt_tokens']} | {r['tok_per_s']} |")
    cold = result["warm_over_cold_p50"]
    server = result["warm_over_server_p50"]
    lines += [
        "",
        f"- Warm-turn TTFT p50, cache on ÷ cache off (cold): **{cold}** (target ≤ {result['target_warm_over_cold_p50']}: "
        f"{'met' if cold is not None and cold <= result['target_warm_over_cold_p50'] else 'not met'}).",
        f"- Warm-turn TTFT p50, cache on ÷ its own turn 1: {result['warm_over_first_turn_p50']}.",
        f"- Warm-turn TTFT p50, mlx-fleet ÷ mlx_lm.server: {server if server is not None else 'not run'}"
        + ("" if server is None else f" ({'no worse' if server <= 1.0 else 'worse'})") + ".",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs.",
        "", env_markdown(result["env"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: demo model, 2 conversations x 2 turns")
    p.add_argument("--model", default="demo-small", help="demo size to serve (default demo-small)")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--system-tokens", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--skip-server", action="store_true", help="do not run mlx_lm.server")
    p.add_argument("--server-log", default="/tmp/mlx-fleet-bench-mlx-lm-server.log")
    p.add_argument("--out", "--out-dir", dest="out_dir", default=str(results_dir()))
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.conversations, args.turns, args.max_tokens = "demo", 2, 2, 8
        args.system_tokens = min(args.system_tokens, 300)
    result = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "prompt_cache_quick" if args.quick else "prompt_cache"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
