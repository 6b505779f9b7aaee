"""`mlx-fleet` commands for the cluster: keys, load, unload, status; curve options for clients."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from actors.config import DTYPES
from actors.config_load import load_config, parse_model_arg
from actors.curve import CurveKeys, client_keys_from_config, make_keys
from actors.protocol import DEFAULT_CONNECT


def add_client_options(p: argparse.ArgumentParser, *, timeout_s: float) -> None:
    """--connect, --timeout, --config and the CurveZMQ key flags of a command that talks to a fleet."""
    p.add_argument("--connect", default=DEFAULT_CONNECT, help=f"the fleet's client endpoint (default {DEFAULT_CONNECT})")
    p.add_argument("--timeout", type=float, default=timeout_s, help="seconds to wait for the fleet")
    p.add_argument("--config", help="TOML config file (curve_client_secret, curve_server_public)")
    p.add_argument("--curve-secret", metavar="PATH", help="our secret cert (NAME.key_secret) for CurveZMQ")
    p.add_argument("--curve-server-key", metavar="PATH", help="the broker's public cert (broker.key)")


def client_curve(args: argparse.Namespace) -> CurveKeys | None:
    """CurveZMQ client keys from flags, environment or config file; None when curve is off."""
    overrides = {"curve_client_secret": getattr(args, "curve_secret", None),
                 "curve_server_public": getattr(args, "curve_server_key", None)}
    return client_keys_from_config(load_config(getattr(args, "config", None), overrides=overrides))


def _fail(exc: Exception) -> int:
    print(f"mlx-fleet: error: {exc}", file=sys.stderr)
    return 1


def cmd_keys(args: argparse.Namespace) -> int:
    """Write CurveZMQ key pairs, and the folder of authorised public keys."""
    try:
        made = make_keys(args.dir, tuple(args.name), force=args.force)
    except FileExistsError as exc:
        return _fail(exc)
    for name, (public, secret) in made.items():
        print(f"{name}: {public} (public), {secret} (secret)")
    print(f"\nauthorised public keys: {args.dir}/authorized\n"
          f"broker config:  curve_server_secret = \"{args.dir}/broker.key_secret\"\n"
          f"                curve_authorized_dir = \"{args.dir}/authorized\"\n"
          f"clients/workers: --curve-secret {args.dir}/client.key_secret --curve-server-key {args.dir}/broker.key")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """Load a model into a running fleet; wait until its replicas are ready unless --no-wait."""
    from mlx_fleet.client import Client, FleetError

    name, source = parse_model_arg(args.model)
    deadline_s = time.monotonic() + args.timeout
    try:
        with Client(args.connect, timeout_s=args.timeout, curve=client_curve(args)) as client:
            reply = client.load(name, source, replicas=args.replicas, on_demand=args.on_demand,
                                idle_unload_s=args.idle_unload_s, dtype=args.dtype)
            print(f"{name}: {reply.get('message', 'loading')}", flush=True)
            if args.no_wait or args.on_demand or args.replicas == 0:
                return 0
            wait_ready(client, name, args.replicas, deadline_s)
    except FleetError as exc:
        return _fail(exc)
    print(f"{name}: {args.replicas} replica(s) ready")
    return 0


def wait_ready(client: Any, name: str, replicas: int, deadline_s: float) -> None:
    """Poll status until ``name`` has ``replicas`` ready workers; FleetError if one fails or time runs out."""
    from mlx_fleet.client import FleetError

    while True:
        model = client.status().get("models", {}).get(name, {})
        ready = [w for w in model.get("workers", []) if w.get("state") == "ready"]
        if len(ready) >= replicas:
            return
        failed = [w["worker_id"] for w in model.get("workers", []) if w.get("state") == "gave_up"]
        if failed:
            raise FleetError("unavailable", f"worker(s) {', '.join(failed)} failed to start (see the fleet's log)")
        if time.monotonic() >= deadline_s:
            raise FleetError("timeout", f"{len(ready)}/{replicas} replicas of {name} ready; raise --timeout")
        time.sleep(0.2)


def cmd_unload(args: argparse.Namespace) -> int:
    """Drain and stop a model in a running fleet."""
    from mlx_fleet.client import Client, FleetError

    try:
        with Client(args.connect, timeout_s=args.timeout, curve=client_curve(args)) as client:
            reply = client.unload(args.name)
    except FleetError as exc:
        return _fail(exc)
    print(f"{args.name}: unloaded ({reply.get('message', '')})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print models, workers, queues and the BLAS in use (a table, or --json)."""
    from mlx_fleet.client import Client, FleetError

    try:
        with Client(args.connect, timeout_s=args.timeout, curve=client_curve(args)) as client:
            status = client.status()
    except FleetError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    """A live view of the fleet from its status, about once a second (mlx_fleet/top.py)."""
    from mlx_fleet.client import Client, FleetError
    from mlx_fleet.top import run_top

    try:
        with Client(args.connect, timeout_s=args.timeout, curve=client_curve(args)) as client:
            return run_top(lambda: client.status(timeout_s=args.timeout), connect=args.connect,
                           interval_s=max(0.1, args.interval), iterations=max(0, args.iterations))
    except FleetError as exc:
        return _fail(exc)


def format_status(status: dict[str, Any]) -> str:
    """The status map as a table: the broker line, a line per model, a row per replica, recent losses."""
    broker = status.get("broker") or {}
    accepting = "accepting" if status.get("accepting", True) else "DRAINING (new requests refused)"
    lines = [f"broker pid {broker.get('pid', '?')}, restarts {broker.get('restarts', 0)}, {accepting}, "
             f"{status.get('requests', 0)} requests open",
             f"{'MODEL':<16} {'STATE':<10} {'QUEUE':>5} {'RUNNING':>7}  ON-DEMAND",
             f"  {'WORKER':<18} {'HOST':<16} {'PID':>7} {'STATE':<9} {'IN-FLIGHT':>9} {'FREE':>4} "
             f"{'CAP':>4} {'SERVED':>6} {'RESTARTS':>8}  {'PRECISION':<17} BLAS"]
    blas: set[str] = set()
    for name, m in sorted(status.get("models", {}).items()):
        idle = f"yes, idle stop {m['idle_unload_s']:g}s" if m.get("on_demand") else "no"
        lines.append(f"{name:<16} {m.get('state', '?'):<10} {m['queue_depth']:>5} {m['running']:>7}  {idle}")
        for w in m["workers"]:  # registered workers, and (from the supervisor) starting/restarting/hung/gave_up
            lines.append(_worker_line(w))
            if w.get("ranks"):  # a sharded replica: one row, then its ranks
                lines.append("    ranks: " + ", ".join(f"{r.get('rank')} pid {r.get('pid')} on {r.get('host')}"
                                                       for r in w["ranks"]))
            plan = (w.get("info") or {}).get("capacity") or {}
            if plan:  # how its decode capacity was sized (workers/capacity.py)
                lines.append(f"    capacity {plan.get('capacity')}: {plan.get('reason')}")
            b = (w.get("info") or {}).get("blas") or {}
            if b:
                blas.add(f"{b.get('name', '?')} ({b.get('path') or 'bundled'})")
    counters = status.get("counters", {})
    lines.append("\n" + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    routing = status.get("routing") or {}
    if routing:
        lines.append(f"routing: {routing.get('policy')} (balance_abs {routing.get('balance_abs')}, "
                     f"balance_rel {routing.get('balance_rel')})")
    for loss in status.get("recent_worker_losses", [])[-3:]:
        lines.append(f"lost {loss['worker_id']} (pid {loss['pid']}) {loss['ago_s']:.0f}s ago: {loss['reason']}")
    memory = (status.get("supervisor") or {}).get("memory") or {}
    if memory.get("budget_bytes"):
        lines.append(f"memory: {memory.get('loaded_bytes', 0) / 2**20:.1f} MiB of weights loaded, "
                     f"budget {memory['budget_bytes'] / 2**20:.1f} MiB")
    lines.append("BLAS in use: " + (", ".join(sorted(blas)) or "no worker registered"))
    return "\n".join(lines)


def _worker_line(w: dict[str, Any]) -> str:
    """One replica's row; a worker that is not registered has no host, load, precision or BLAS to show."""
    info = w.get("info") or {}
    b = info.get("blas") or {}
    if w["state"] in ("ready", "retiring"):
        return (f"  {w['worker_id']:<18} {str(w['host'])[:16]:<16} {w['pid']:>7} {w['state']:<9} "
                f"{w['in_flight']:>9} {w['free']:>4} {w['capacity']:>4} {w.get('served', 0):>6} "
                f"{w.get('restarts', 0):>8}  {str(info.get('precision', '-')):<17} {b.get('name', '-')}")
    return (f"  {w['worker_id']:<18} {'(local)':<16} {w.get('pid') or '-':>7} {w['state']:<9} "
            f"{'-':>9} {'-':>4} {'-':>4} {'-':>6} {w.get('restarts', 0):>8}  {'-':<17} -")


def add_cluster_commands(sub: Any) -> None:
    """Register keys, load, unload and status with the top-level parser."""
    ks = sub.add_parser("keys", help="write CurveZMQ key pairs and the authorised-keys folder")
    ks.add_argument("dir", help="folder for the certificates")
    ks.add_argument("--name", action="append", default=None, metavar="NAME",
                    help="a key pair to make (repeatable; default: broker, client, worker)")
    ks.add_argument("--force", action="store_true", help="replace existing key pairs")
    ks.set_defaults(func=lambda a: cmd_keys(_default_names(a)))

    ld = sub.add_parser("load", help="load a model into a running fleet")
    ld.add_argument("model", metavar="NAME=SOURCE")
    ld.add_argument("--replicas", type=int, default=1)
    ld.add_argument("--on-demand", action="store_true", help="start its worker at the first request")
    ld.add_argument("--idle-unload-s", type=float, help="on-demand: stop after this many idle seconds")
    ld.add_argument("--dtype", choices=DTYPES, help="its precision (default: the fleet's dtype)")
    ld.add_argument("--no-wait", action="store_true", help="return once started, not once ready")
    add_client_options(ld, timeout_s=180.0)
    ld.set_defaults(func=cmd_load)

    ul = sub.add_parser("unload", help="drain and unload a model from a running fleet")
    ul.add_argument("name")
    add_client_options(ul, timeout_s=120.0)
    ul.set_defaults(func=cmd_unload)

    st = sub.add_parser("status", help="models, replicas, queues and BLAS of a running fleet")
    st.add_argument("--json", action="store_true")
    add_client_options(st, timeout_s=5.0)
    st.set_defaults(func=cmd_status)

    tp = sub.add_parser("top", help="a live view of a running fleet (q quits; plain lines when not a terminal)")
    tp.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    tp.add_argument("--iterations", type=int, default=0, help="stop after N refreshes (default 0: until q or Ctrl-C)")
    add_client_options(tp, timeout_s=5.0)
    tp.set_defaults(func=cmd_top)


def _default_names(args: argparse.Namespace) -> argparse.Namespace:
    if not args.name:
        args.name = ["broker", "client", "worker"]
    return args
