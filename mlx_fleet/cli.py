"""The `mlx-fleet` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from actors.config import DTYPES, POLICIES, ROUTINGS, ConfigError, FleetConfig
from actors.config_load import load_config, parse_model_arg
from actors.protocol import DEFAULT_CONNECT
from actors.shard_group import RING_STARTING_PORT, SHARD_MODES
from mlx_fleet.cli_cluster import add_client_options, add_cluster_commands, client_curve


def _counts(values: list[str], flag: str = "--replicas") -> dict[str, int]:
    out: dict[str, int] = {}
    for text in values:
        name, sep, count = text.partition("=")
        if not sep or not count.isdigit():
            raise ConfigError(f"{flag}: expected NAME=N, got {text!r}")
        out[name] = int(count)
    return out


def _texts(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in values:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag}: expected NAME=VALUE, got {text!r}")
        out[name] = value
    return out


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    """Build the FleetConfig for `up` from flags, env and the config file."""
    overrides: dict[str, Any] = {
        "frontend": args.frontend, "backend": args.backend, "metrics_port": args.metrics_port,
        "metrics_events": args.metrics_events,
        "ready_timeout_s": args.ready_timeout, "drain_timeout_s": args.drain_timeout, "blas": args.blas,
        "policy": args.policy, "window_ms": args.window_ms, "decode_window_ms": args.decode_window_ms, "decode_capacity": args.decode_capacity,
        "kv_memory_fraction": args.kv_memory_fraction, "routing": args.routing, "admission_batch": args.admission_batch, "log_level": args.log_level,
        "prompt_cache_entries": args.prompt_cache_entries, "prompt_cache_bytes": args.prompt_cache_bytes,
        "http_host": args.http_host, "http_port": args.http_port, "api_key": args.api_key, "dtype": args.dtype,
    }
    if args.no_fast_path:
        overrides["fast_path"] = False
    if args.auto_tune:
        overrides["auto_tune"] = True
    overrides.update(cluster_overrides(args))
    models = [parse_model_arg(m) for m in args.model]
    return load_config(args.config, overrides=overrides, models=models, replicas=_counts(args.replicas),
                       shards=_counts(args.shards, "--shards"), chat_templates=_texts(args.chat_template, "--chat-template"),
                       tool_formats=_texts(args.tool_format, "--tool-format"))


def cluster_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `up` flags of the cluster settings (CurveZMQ, bind policy, memory budget)."""
    out: dict[str, Any] = {"curve_server_secret": args.curve_server_secret,
                           "curve_authorized_dir": args.curve_authorized_dir,
                           "memory_budget_bytes": args.memory_budget_bytes}
    if args.insecure:
        out["insecure"] = True
    return out


def cmd_up(args: argparse.Namespace) -> int:
    """Run broker and workers in the foreground until Ctrl-C."""
    from actors.logs import setup_logging
    from actors.supervisor import run_fleet
    from mlx_fleet.wiring import make_supervisor

    cfg = config_from_args(args)
    setup_logging(cfg.log_level, "fleet")
    names = ", ".join(f"{m.name}={m.source} x{m.replicas}" + (f" ({m.shards} ranks each)" if m.shards > 1 else "")
                      for m in cfg.models)
    log = logging.getLogger("mlx_fleet")
    http = f", OpenAI HTTP on http://{cfg.http_host}:{cfg.http_port}/v1" if cfg.http_port else ""
    log.info("starting fleet: %s; clients on %s%s", names, cfg.frontend, http)
    return run_fleet(make_supervisor(cfg),
                     on_ready=lambda: log.info("fleet ready on %s%s (Ctrl-C to stop)", cfg.frontend, http))


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one completion to stdout."""
    from mlx_fleet.client import Client, FleetError

    options: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        options["seed"] = args.seed
    if args.chat:  # the prompt as one user message, formatted by the model's chat template
        options["messages"] = [{"role": "user", "content": args.prompt}]
    try:
        options.update(decoding_options(args))
    except ValueError as exc:
        print(f"mlx-fleet: error: {exc}", file=sys.stderr)
        return 2
    logprobs: list[dict[str, Any]] = []
    try:
        with Client(args.connect, timeout_s=args.timeout, curve=client_curve(args)) as client:
            stream = client.stream(None if args.chat else args.prompt, model=args.model, **options)
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                logprobs += chunk.logprobs or []
            sys.stdout.write("\n")
        for entry in logprobs:  # on stderr: stdout stays the text alone
            tops = ", ".join(f"{t['token']!r} {t['logprob']:.4f}" for t in entry["top_logprobs"])
            print(f"{entry['logprob']:9.4f}  {entry['token']!r}" + (f"  top: {tops}" if tops else ""), file=sys.stderr)
    except FleetError as exc:
        print(f"mlx-fleet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmlx-fleet: interrupted", file=sys.stderr)
        return 130
    return 0


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``grammar`` and logprobs fields that ``generate``'s flags ask for; a bad schema file raises ValueError."""
    out: dict[str, Any] = {}
    if args.json_schema is not None:
        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--json-schema {args.json_schema}: {exc}") from None
        out["grammar"] = {"type": "json_schema", "schema": schema}
    elif args.regex is not None:
        out["grammar"] = {"type": "regex", "pattern": args.regex}
    elif args.choice is not None:
        out["grammar"] = {"type": "choice", "choices": [c for c in args.choice.split(",") if c]}
    if args.logprobs is not None:
        out.update(logprobs=True, top_logprobs=args.logprobs)
    return out


def cmd_chat(args: argparse.Namespace) -> int:
    """A conversation in the terminal (mlx_fleet/chat.py)."""
    from mlx_fleet.chat import chat_command
    from mlx_fleet.client import Client

    return chat_command(args, lambda: Client(args.connect, timeout_s=args.timeout, curve=client_curve(args)))


def cmd_pull(args: argparse.Namespace) -> int:
    """Fetch and convert a SOURCE into the cache now, as a worker would; print its folder."""
    from workers.models.sources import fetch_source, resolve_source

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        found: Path | str | None
        if args.fetch_only:
            found = fetch_source(args.source, progress=say)
        else:
            found = resolve_source(args.source, args.dtype, progress=say)
        print(found if found is not None else f"{args.source}: nothing to fetch")
    except (OSError, ValueError, RuntimeError) as exc:  # not found, refused GGUF, failed fetch
        print(f"mlx-fleet: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    """Write the built-in demo model to a folder."""
    from pathlib import Path

    from workers.models.demo_model import write_demo_model

    path = write_demo_model(Path(args.path), args.size)
    print(path)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Join a running broker as a worker for one model."""
    from actors.logs import setup_logging
    from mlx_fleet.worker_entry import worker_settings
    from workers.worker import run_worker

    cfg = load_config(args.config, overrides={"blas": args.blas, "log_level": args.log_level, "dtype": args.dtype,
                                              "decode_capacity": args.decode_capacity})
    name, source = parse_model_arg(args.model)
    plan = None
    if args.shards > 1 or args.hostfile or args.rank is not None:
        from mlx_fleet.shard_worker import plan_group

        plan = plan_group(args, cfg)  # refuses a group it cannot form before anything starts
    worker_id = args.worker_id or f"{name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    setup_logging(cfg.log_level, f"worker:{worker_id}")
    curve = {"curve_secret": args.curve_secret or cfg.curve_client_secret,
             "curve_server_public": args.curve_server_key or cfg.curve_server_public}
    if bool(curve["curve_secret"]) != bool(curve["curve_server_public"]):
        raise ConfigError("--curve-secret and --curve-server-key go together")
    settings = worker_settings(cfg, **curve, worker_id=worker_id, model=name, source=source, connect=args.connect,
                               batching=cfg.batching, metrics_events=args.metrics_events, dtype=cfg.dtype,
                               chat_template=args.chat_template or "", tool_format=args.tool_format or "")
    settings = dataclasses.replace(settings, memory_share=max(1, args.memory_share))
    if plan is not None:
        from mlx_fleet.shard_worker import run_sharded_worker

        return run_sharded_worker(plan, args, settings, cfg)
    run_worker(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    p = argparse.ArgumentParser(prog="mlx-fleet", description="Serve MLX language models behind one ZeroMQ endpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    add_up_command(sub)
    add_generate_command(sub)
    add_model_commands(sub)
    dm = sub.add_parser("demo-model", help="write the built-in demo model to PATH")
    dm.add_argument("path")
    dm.add_argument("--size", default="demo", choices=["demo", "demo-small"])
    dm.set_defaults(func=cmd_demo_model)
    add_worker_command(sub)
    add_cluster_commands(sub)
    return p


def add_up_command(sub: Any) -> None:
    """`mlx-fleet up` and its settings."""
    up = sub.add_parser("up", help="run broker and workers in the foreground")
    up.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                    help="a model to serve (repeatable); SOURCE is a folder, a .gguf file, a hub id, "
                         "or smollm2 / demo / demo-small")
    up.add_argument("--replicas", action="append", default=[], metavar="NAME=N")
    up.add_argument("--shards", action="append", default=[], metavar="NAME=N",
                    help="split a model's weights over a group of N ranks (MLX's ring backend) per replica")
    up.add_argument("--chat-template", action="append", default=[], metavar="NAME=TEMPLATE",
                    help="a Jinja chat template file (or smollm2-tools) for model NAME, replacing its tokenizer's")
    up.add_argument("--tool-format", action="append", default=[], metavar="NAME=FORMAT",
                    help="how model NAME writes tool calls: an mlx-lm tool parser (json_tools, ...) or none")
    up.add_argument("--config", help="TOML config file")
    up.add_argument("--frontend", help=f"client endpoint to bind (default {DEFAULT_CONNECT})")
    up.add_argument("--backend", help="worker endpoint to bind (default tcp://127.0.0.1:5556)")
    up.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464)")
    up.add_argument("--metrics-events", metavar="ADDR",
                    help="endpoint the collector binds for metric events (default tcp://127.0.0.1:5557)")
    up.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP gateway port (default 8000; 0 turns it off)")
    up.add_argument("--http-host", help="address the HTTP gateway binds (default 127.0.0.1)")
    up.add_argument("--api-key", help="bearer token the HTTP gateway requires (prefer the env var MLX_FLEET_API_KEY)")
    up.add_argument("--ready-timeout", type=float, help="seconds to wait for workers (ready_timeout_s)")
    up.add_argument("--drain-timeout", type=float, help="seconds to let in-flight requests finish on stop")
    up.add_argument("--blas", help="auto | reference | openblas | mkl | PATH (Linux CPU)")
    up.add_argument("--dtype", choices=DTYPES, help="the models' precision (default auto: float32 on CPU, else quantized)")
    up.add_argument("--policy", choices=POLICIES)
    up.add_argument("--window-ms", type=float)
    up.add_argument("--decode-window-ms", type=float, help="least admission window while sequences decode")
    up.add_argument("--no-fast-path", action="store_true")
    up.add_argument("--auto-tune", action="store_true")
    up.add_argument("--decode-capacity", help="sequences decoding at once per worker: auto (sized from memory, "
                                              "the default) or N")
    up.add_argument("--kv-memory-fraction", type=float, help="share of the free memory auto capacity fills (0.5)")
    up.add_argument("--routing", choices=ROUTINGS, help="cache_aware (the default) or least_loaded")
    up.add_argument("--admission-batch", type=int, help="waiting requests prefilled together")
    up.add_argument("--prompt-cache-entries", type=int, help="KV caches kept per worker for prefix reuse (0: off)")
    up.add_argument("--prompt-cache-bytes", type=int, help="most bytes of KV cache kept per worker (0: off)")
    up.add_argument("--log-level")
    up.add_argument("--insecure", action="store_true", help="allow binding a non-loopback address without CurveZMQ")
    up.add_argument("--curve-server-secret", metavar="PATH", help="the broker's secret cert; turns CurveZMQ on")
    up.add_argument("--curve-authorized-dir", metavar="DIR", help="public certs of the clients and workers let in")
    up.add_argument("--memory-budget-bytes", type=int, help="refuse loads whose estimated weights exceed this")
    up.set_defaults(func=cmd_up)


def add_generate_command(sub: Any) -> None:
    """`mlx-fleet generate`."""
    gen = sub.add_parser("generate", help="stream a completion to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--chat", action="store_true", help="send PROMPT as one user message (the model's chat template)")
    grammar = gen.add_mutually_exclusive_group()
    grammar.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under the JSON Schema in FILE")
    grammar.add_argument("--regex", metavar="R", help="the output matches the regular expression R")
    grammar.add_argument("--choice", metavar="A,B,C", help="the output is one of these comma-separated strings")
    gen.add_argument("--logprobs", type=int, metavar="K", help="print each token's logprob and its K most likely "
                     "alternatives (0-20) to stderr after the text")
    add_client_options(gen, timeout_s=60.0)
    gen.set_defaults(func=cmd_generate)


def add_model_commands(sub: Any) -> None:
    """`mlx-fleet chat` and `mlx-fleet pull`."""
    from mlx_fleet.chat import add_chat_arguments

    ch = sub.add_parser("chat", help="a conversation in the terminal (one answer when stdin is not a terminal)")
    add_chat_arguments(ch)
    add_client_options(ch, timeout_s=300.0)
    ch.set_defaults(func=cmd_chat)
    pl = sub.add_parser("pull", help="fetch and convert a model SOURCE into the cache now (smollm2, a .gguf file...)")
    pl.add_argument("source")
    pl.add_argument("--dtype", choices=DTYPES, default="auto", help="the precision to convert a GGUF file to")
    pl.add_argument("--fetch-only", action="store_true", help="download what SOURCE needs, convert nothing")
    pl.set_defaults(func=cmd_pull)


def add_worker_command(sub: Any) -> None:
    """`mlx-fleet worker`: a worker joining a broker from another machine."""
    wk = sub.add_parser("worker", help="join a running broker as a worker")
    wk.add_argument("--connect", required=True, help="the broker's worker endpoint, e.g. tcp://HOST:5556")
    wk.add_argument("--model", required=True, metavar="NAME=SOURCE")
    wk.add_argument("--worker-id")
    wk.add_argument("--chat-template", metavar="TEMPLATE", help="a Jinja chat template file (or smollm2-tools)")
    wk.add_argument("--tool-format", metavar="FORMAT", help="an mlx-lm tool parser name (json_tools, ...) or none")
    wk.add_argument("--metrics-events", metavar="ADDR",
                    help="the fleet collector's event endpoint, e.g. tcp://HOST:5557 (default: send no metrics)")
    wk.add_argument("--config")
    wk.add_argument("--blas")
    wk.add_argument("--dtype", choices=DTYPES)
    wk.add_argument("--log-level")
    wk.add_argument("--decode-capacity", help="sequences decoded at once: auto (sized from memory, the default) or N")
    wk.add_argument("--memory-share", type=int, default=1, metavar="N",
                    help="worker processes sharing this machine's memory: auto capacity takes 1/N of it (default 1)")
    wk.add_argument("--curve-secret", metavar="PATH", help="this worker's secret cert (NAME.key_secret)")
    wk.add_argument("--curve-server-key", metavar="PATH", help="the broker's public cert (broker.key)")
    wk.add_argument("--shards", type=int, default=1, metavar="N", help="run the model as a group of N ranks")
    wk.add_argument("--shard-mode", default="auto", choices=SHARD_MODES,
                    help="tensor or pipeline parallelism (default auto: tensor where the model supports it)")
    wk.add_argument("--hostfile", metavar="PATH", help="an mlx.launch hostfile: the hosts of the ranks, in rank order")
    wk.add_argument("--rank", type=int, help="with --hostfile: run only this machine's rank")
    wk.add_argument("--ring-port", type=int, default=RING_STARTING_PORT,
                    help=f"the ring's first port, one more per host address (mlx.launch's --starting-port; "
                         f"default {RING_STARTING_PORT})")
    wk.set_defaults(func=cmd_worker)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mlx-fleet` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mlx-fleet: config error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (`| head`): stop quietly, as other command-line tools do.
        # Output still buffered would raise again at exit, so stdout points at /dev/null from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool a closed pipe stopped


if __name__ == "__main__":
    sys.exit(main())
