"""Multi-host cluster on Linux network namespaces: a broker and two remote workers over tcp + CurveZMQ.

The test builds its own network: namespaces ``B`` (broker), ``W1`` and ``W2``
(one worker each), joined to ``B`` by one veth pair per worker on private
subnets that exist only inside those namespaces. Everything it creates is
removed in ``finally``. It needs root (``ip netns add``); elsewhere it skips.

Scenario: a burst of non-streaming requests spreads over both workers; W1's
link goes down; the broker declares W1 dead after the heartbeat liveness and
requeues W1's unstarted-output requests onto W2, so every request still
completes; the fleet serves new requests meanwhile; the link comes back and W1
registers again and serves.

A second scenario puts a sharded group across machines: namespaces ``R0`` and
``R1`` on one bridge with the broker's namespace, each running its own rank of
demo-small (``mlx-fleet worker --shards 2 --hostfile hosts.json --rank R``) over
MLX's ring backend. The group serves greedy tokens exactly as in-process mlx_lm
does; kill -9 of rank 1 brings the group down, each machine restarts its rank,
and the group forms again and serves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from actors.curve import make_keys
from tests.integration.processes import ROOT, WorkerProcess, cli, write_config
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]  # 30-40 s

HEARTBEAT_S = 0.5  # lenient enough for a loaded 2-core VM: a slow engine step is not silence
LIVENESS = 4
FRONTEND = "tcp://127.0.0.1:5555"  # loopback inside the broker's namespace
BACKEND_PORT = 5556


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise with its stderr on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def netns_unavailable() -> str:
    """Why this machine cannot run the test, or ''."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (ip netns add); run the suite as root to include it"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"mlxf-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"cannot create a network namespace here: {exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return ""


class Network:
    """Three namespaces and two veth pairs, named after this process so runs never collide."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.broker, self.w1, self.w2 = f"mlxf{tag}b", f"mlxf{tag}w1", f"mlxf{tag}w2"
        # veth names are at most 15 characters; one end of each pair lives in the broker's namespace.
        self.links = {self.w1: (f"mx{tag}b1", f"mx{tag}w1", "10.77.1"), self.w2: (f"mx{tag}b2", f"mx{tag}w2", "10.77.2")}
        self.made: list[str] = []

    def create(self) -> None:
        """Namespaces with loopback up, then a veth pair from the broker to each worker."""
        for ns in (self.broker, self.w1, self.w2):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for ns, (b_end, w_end, net) in self.links.items():
            ip("link", "add", b_end, "netns", self.broker, "type", "veth", "peer", "name", w_end, "netns", ns)
            ip("-n", self.broker, "addr", "add", f"{net}.1/24", "dev", b_end)
            ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", w_end)
            ip("-n", self.broker, "link", "set", b_end, "up")
            ip("-n", ns, "link", "set", w_end, "up")

    def broker_addr(self, worker_ns: str) -> str:
        """The broker's worker endpoint as seen from ``worker_ns``."""
        return f"tcp://{self.links[worker_ns][2]}.1:{BACKEND_PORT}"

    def set_link(self, worker_ns: str, state: str) -> None:
        """Take the broker's end of a worker's link down or up."""
        ip("-n", self.broker, "link", "set", self.links[worker_ns][0], state)

    def destroy(self) -> None:
        """Delete the namespaces (their veth pairs go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()

    @staticmethod
    def exec(ns: str) -> list[str]:
        """The prefix that runs a command inside ``ns``."""
        return ["ip", "netns", "exec", ns]


def stop_all(procs: list[Any]) -> None:
    """Stop what a test started, newest first: workers say goodbye, other processes get SIGTERM then SIGKILL."""
    for p in reversed(procs):
        stop = getattr(p, "stop", None)
        if stop is not None:
            stop()
        elif p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def write_broker_config(path: Path, keys: dict[str, tuple[Path, Path]]) -> Path:
    path.write_text(f"""
frontend = "{FRONTEND}"
backend = "tcp://0.0.0.0:{BACKEND_PORT}"
http_port = 0
heartbeat_interval_s = {HEARTBEAT_S}
heartbeat_liveness = {LIVENESS}
drain_timeout_s = 5.0
curve_server_secret = "{keys['broker'][1]}"
curve_authorized_dir = "{keys['broker'][0].parent / 'authorized'}"

[[models]]
name = "demo"
source = "demo"
replicas = 0
""")
    return path


def test_worker_link_down_is_declared_dead_requeued_and_rejoins(tmp_path: Path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    keys = make_keys(tmp_path / "keys")
    client_flags = ["--connect", FRONTEND, "--curve-secret", str(keys["client"][1]),
                    "--curve-server-key", str(keys["broker"][0])]
    net = Network()
    procs: list[Any] = []
    broker_log = tmp_path / "broker.log"
    try:
        net.create()
        broker = subprocess.Popen([*net.exec(net.broker), sys.executable, "-m", "mlx_fleet", "up", "--config",
                                   str(write_broker_config(tmp_path / "fleet.toml", keys))],
                                  cwd=ROOT, stdout=open(broker_log, "wb"), stderr=subprocess.STDOUT)
        procs.append(broker)

        def status() -> dict[str, Any] | None:
            done = cli("status", "--json", *client_flags, "--timeout", "3", prefix=net.exec(net.broker), timeout_s=30)
            return json.loads(done.stdout) if done.returncode == 0 else None

        def workers() -> dict[str, dict[str, Any]]:
            s = status()
            return {w["worker_id"]: w for w in s["models"]["demo"]["workers"]} if s else {}

        wait_for(status, 60, "the broker in its namespace to answer status (see broker.log)")
        conf = write_config(tmp_path / "w.toml", heartbeat_interval_s=HEARTBEAT_S, heartbeat_liveness=LIVENESS)
        for ns, wid in ((net.w1, "w1"), (net.w2, "w2")):
            w = WorkerProcess("--connect", net.broker_addr(ns), "--model", "demo=demo", "--worker-id", wid,
                              "--config", str(conf), "--curve-secret", str(keys["worker"][1]),
                              "--curve-server-key", str(keys["broker"][0]), prefix=net.exec(ns),
                              log_path=tmp_path / f"{wid}.log")
            procs.append(w.__enter__())
        wait_for(lambda: set(workers()) == {"w1", "w2"}, 120, "both remote workers to register")

        burst = subprocess.Popen([*net.exec(net.broker), sys.executable, "-m", "tests.integration.netns_driver",
                                  *client_flags, "burst", "8", "1500"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        procs.append(burst)
        # 1500 tokens take several seconds, so w1 still holds its share when its link goes down.
        wait_for(lambda: (lambda ws: len(ws) == 2 and all(w["in_flight"] > 0 for w in ws.values()))(workers()), 60,
                 "the burst to run on both workers")
        net.set_link(net.w1, "down")
        down_s = time.monotonic()
        after = wait_for(lambda: (lambda s: s if s and "w1" not in {w["worker_id"] for w in s["models"]["demo"]["workers"]}
                                  else None)(status()), 30, "the broker to declare w1 dead")
        # Not before the liveness ran out (its last heartbeat may predate the cut by up to one interval).
        assert time.monotonic() - down_s >= HEARTBEAT_S * (LIVENESS - 1)
        wait_for(lambda: "worker w1 lost: no heartbeat for" in broker_log.read_text(), 5,
                 "the broker to log that w1 went silent")
        counters = after["counters"]
        assert counters["workers_lost"] >= 1 and counters["requeued"] >= 1, (counters, broker_log.read_text()[-3000:])
        # The fleet keeps serving through w2 while w1 is cut off.
        served = cli("generate", "--model", "demo", "--max-tokens", "4", *client_flags, "Still there?",
                     prefix=net.exec(net.broker), timeout_s=120)
        assert served.returncode == 0, served.stderr
        out, _ = burst.communicate(timeout=240)
        outcomes = json.loads(out.strip().splitlines()[-1])
        assert len(outcomes) == 8 and all(o in ("length", "stop") for o in outcomes), outcomes

        net.set_link(net.w1, "up")
        wait_for(lambda: "w1" in workers(), 90, "w1 to rejoin after its link came back")
        for i in range(4):
            again = cli("generate", "--model", "demo", "--max-tokens", "4", *client_flags, f"Back {i}",
                        prefix=net.exec(net.broker), timeout_s=120)
            assert again.returncode == 0, again.stderr
        assert workers()["w1"]["served"] >= 1
    finally:
        stop_all(procs)
        net.destroy()


class GroupNetwork:
    """The broker's namespace and two rank namespaces on one bridge (10.78.0.0/24), named after this process."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.broker, self.ranks = f"mlxg{tag}b", [f"mlxg{tag}r0", f"mlxg{tag}r1"]
        self.bridge = f"br{tag}"
        self.ips = ["10.78.0.2", "10.78.0.3"]
        self.made: list[str] = []

    def create(self) -> None:
        """Namespaces with loopback up, a bridge in the broker's, and a veth from it to each rank's."""
        for ns in (self.broker, *self.ranks):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.broker, "link", "add", self.bridge, "type", "bridge")
        ip("-n", self.broker, "addr", "add", "10.78.0.1/24", "dev", self.bridge)
        ip("-n", self.broker, "link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.ranks, self.ips)):
            b_end, r_end = f"mg{os.getpid() % 100000}b{i}", f"mg{os.getpid() % 100000}r{i}"
            ip("link", "add", b_end, "netns", self.broker, "type", "veth", "peer", "name", r_end, "netns", ns)
            ip("-n", self.broker, "link", "set", b_end, "master", self.bridge)
            ip("-n", self.broker, "link", "set", b_end, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", r_end)
            ip("-n", ns, "link", "set", r_end, "up")

    def destroy(self) -> None:
        """Delete the namespaces (the bridge and veth pairs go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()


def test_a_sharded_group_across_two_machines_serves_and_reforms_after_a_rank_dies(tmp_path: Path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    from tests.integration.reference import greedy_reference
    from workers.models.demo_model import ensure_demo_model
    from workers.models.precision import load_model

    keys = make_keys(tmp_path / "keys")
    curve = ["--curve-secret", str(keys["client"][1]), "--curve-server-key", str(keys["broker"][0])]
    net = GroupNetwork()
    procs: list[Any] = []
    try:
        net.create()
        procs.append(subprocess.Popen([*Network.exec(net.broker), sys.executable, "-m", "mlx_fleet", "up", "--config",
                                       str(write_broker_config(tmp_path / "fleet.toml", keys))], cwd=ROOT,
                                      stdout=open(tmp_path / "broker.log", "wb"), stderr=subprocess.STDOUT))

        def group() -> dict[str, Any] | None:
            done = cli("status", "--json", "--connect", FRONTEND, *curve, "--timeout", "3",
                       prefix=Network.exec(net.broker), timeout_s=30)
            rows = json.loads(done.stdout)["models"]["demo"]["workers"] if done.returncode == 0 else []
            return next((r for r in rows if r["worker_id"] == "g" and r["state"] == "ready"), None)

        def greedy(ids: list[int]) -> list[int]:
            done = subprocess.run([*Network.exec(net.broker), sys.executable, "-m", "tests.integration.netns_driver",
                                   "--connect", FRONTEND, *curve, "greedy", "24", ",".join(map(str, ids))],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout.strip().splitlines()[-1])

        hosts = tmp_path / "hosts.json"
        hosts.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": f"r{i}", "ips": [a]}
                                                                  for i, a in enumerate(net.ips)]}))
        conf = write_config(tmp_path / "w.toml", heartbeat_interval_s=HEARTBEAT_S, heartbeat_liveness=LIVENESS,
                                   restart_backoff_s=0.2)
        for rank in (1, 0):
            w = WorkerProcess("--connect", f"tcp://10.78.0.1:{BACKEND_PORT}", "--model", "demo=demo-small",
                              "--worker-id", "g", "--shards", "2", "--hostfile", str(hosts), "--rank", str(rank),
                              "--config", str(conf), "--curve-secret", str(keys["worker"][1]),
                              "--curve-server-key", str(keys["broker"][0]), prefix=Network.exec(net.ranks[rank]),
                              log_path=tmp_path / f"rank{rank}.log")
            procs.append(w.__enter__())
        first = wait_for(group, 120, "the two-rank group to register (see rank0.log, rank1.log)")
        assert [r["rank"] for r in first["ranks"]] == [0, 1] and first["info"]["shard_mode"] == "tensor"
        model, tokenizer = load_model(str(ensure_demo_model("demo-small")))
        ids = tokenizer.encode("Once upon a time")
        assert greedy(ids) == greedy_reference(model, tokenizer, ids, 24)[0]

        subprocess.run(["kill", "-9", str(first["ranks"][1]["pid"])], check=True, timeout=10)
        again = wait_for(lambda: (lambda g: g if g and g["pid"] != first["pid"] else None)(group()), 120,
                         "the group to form again on both machines")
        assert again["ranks"][1]["pid"] != first["ranks"][1]["pid"]
        assert greedy(ids) == greedy_reference(model, tokenizer, ids, 24)[0]
    finally:
        stop_all(procs)
        net.destroy()
