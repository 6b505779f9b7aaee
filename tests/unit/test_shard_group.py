"""A sharded replica's group, without MLX: the ring environment, the hostfile, the group as one process,
the op channel's messages and the checks that end a broken group; config, budget and status."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from actors.clock import FakeClock
from actors.config import ConfigError, FleetConfig, ModelSpec, shard_bounds
from actors.config_load import load_config
from actors.model_manager import budget_verdict, per_rank_bytes
from actors.shard_group import (
    ProcessGroup, ShardRank, local_ring, rank_from_env, read_launch_hostfile, ring_env, ring_from_hosts, split_addr,
)
from tests.unit.test_supervisor import FakeProcess
from workers.shard.channel import BeatTracker, GroupLost, OpError, StallCheck, StepLedger, check_op, pack, unpack

RING = (("127.0.0.1:4000",), ("127.0.0.1:4001",))


# ---- the ring ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"rank": 0, "ring": RING[:1]}, "at least 2 ranks"),
    ({"rank": 2, "ring": RING}, "outside a group of 2"),
    ({"rank": 0, "ring": RING, "mode": "data"}, "shard_mode"),
    ({"rank": 0, "ring": (("127.0.0.1:1",), ())}, "at least one ip:port"),
])
def test_a_rank_outside_its_group_is_refused(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ShardRank(**kwargs)


def test_a_rank_knows_its_group() -> None:
    r = ShardRank(1, (("10.0.0.1:5000",), ("10.0.0.2:5001",), ("10.0.0.3:5002",)))
    assert (r.size, r.rank0_host, r.own_host) == (3, "10.0.0.1", "10.0.0.2")


@pytest.mark.parametrize(("addr", "expected"), [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:5", ("::1", 5))])
def test_split_addr(addr: str, expected: tuple[str, int]) -> None:
    assert split_addr(addr) == expected


@pytest.mark.parametrize("addr", ["127.0.0.1", ":80", "host:0", "host:x", "host:70000"])
def test_split_addr_refuses(addr: str) -> None:
    with pytest.raises(ValueError, match="ip:port"):
        split_addr(addr)


def test_local_ring_takes_distinct_free_ports() -> None:
    ports = iter([5000, 5000, 5001, 5002])
    assert local_ring(3, free_port=lambda: next(ports)) == (("127.0.0.1:5000",), ("127.0.0.1:5001",),
                                                           ("127.0.0.1:5002",))
    with pytest.raises(ValueError):
        local_ring(1)


def test_the_ring_from_hosts_is_mlx_launchs() -> None:
    # mlx.launch --backend ring: the starting port, one more per host address, in rank order.
    ring = ring_from_hosts([["10.0.0.1"], ["10.0.0.2", "10.0.1.2"], ["10.0.0.3"]], starting_port=5000)
    assert ring == (("10.0.0.1:5000",), ("10.0.0.2:5001", "10.0.1.2:5002"), ("10.0.0.3:5003",))
    with pytest.raises(ValueError, match="ips"):
        ring_from_hosts([["10.0.0.1"], []])


@pytest.mark.parametrize("content", [
    [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}],
    {"backend": "ring", "envs": [], "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]},
])
def test_read_launch_hostfile(tmp_path: Path, content: Any) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(content))
    assert read_launch_hostfile(str(path)) == [("a", ["10.0.0.1"]), ("b", ["10.0.0.2"])]


@pytest.mark.parametrize(("text", "needle"), [
    ("not json", "hostfile"),
    ("[]", "a list of hosts"),
    ('[{"ssh": "a"}]', "needs \"ssh\""),
    ('[{"ssh": "a", "ips": []}]', "needs \"ssh\""),
    ('{"backend": "mpi", "hosts": [{"ssh": "a", "ips": ["1.2.3.4"]}]}', "runs on 'ring'"),
])
def test_read_launch_hostfile_refuses(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        read_launch_hostfile(str(path))


def test_the_ring_environment_round_trips(tmp_path: Path) -> None:
    env = ring_env(ShardRank(1, RING), str(tmp_path))
    assert env["MLX_RANK"] == "1" and json.loads(Path(env["MLX_HOSTFILE"]).read_text()) == [list(a) for a in RING]
    rank = rank_from_env(env, op_timeout_s=5.0)
    assert rank == ShardRank(1, RING, op_timeout_s=5.0)
    assert rank_from_env({}) is None
    with pytest.raises(ValueError, match="MLX_RANK"):
        rank_from_env({"MLX_RANK": "x", "MLX_HOSTFILE": env["MLX_HOSTFILE"]})


# ---- the group as one process ---------------------------------------------------------------------

def test_a_group_is_one_process_that_dies_whole() -> None:
    ranks = [FakeProcess(10), FakeProcess(11), FakeProcess(12)]
    group = ProcessGroup(ranks, host="h")
    assert group.pid == 10 and group.is_alive() and group.exitcode is None
    assert group.view() == [{"rank": 0, "pid": 10, "host": "h"}, {"rank": 1, "pid": 11, "host": "h"},
                            {"rank": 2, "pid": 12, "host": "h"}]
    ranks[2].exitcode = 75  # a follower saw its group break
    assert not group.is_alive() and group.exitcode == 75
    assert ranks[0].signals == ["KILL"] and ranks[1].signals == ["KILL"] and ranks[2].signals == []
    assert group.exitcode == 75  # the first rank seen gone names the exit, not the ones killed after it


def test_terminating_a_group_asks_rank_0_and_kill_ends_every_rank() -> None:
    ranks = [FakeProcess(10), FakeProcess(11)]
    group = ProcessGroup(ranks)
    group.terminate()
    assert ranks[0].signals == ["TERM"] and ranks[1].signals == []  # rank 0 closes the group itself
    group.kill()
    assert all(r.signals[-1] == "KILL" for r in ranks) and not group.is_alive()


# ---- the op channel ---------------------------------------------------------------------------------

REQ = {"key": "k", "prompt_tokens": [1, 2], "max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
       "seed": None, "stop": [], "cache": True}


@pytest.mark.parametrize("op", [["insert", [REQ]], ["step", 3], ["remove", ["k"], "cancelled"], ["admission", 2],
                                ["close"], ["insert", [{**REQ, "seed": 7, "stop": ["x"]}]]])
def test_well_formed_ops_round_trip(op: list[Any]) -> None:
    assert check_op(unpack(pack(op))) == op


@pytest.mark.parametrize(("op", "needle"), [
    (["jump"], "unknown op"),
    (["step"], "expected"),
    (["step", "3"], "expected"),
    (["remove", [1], "cancelled"], "strings"),
    (["insert", [{**REQ, "extra": 1}]], "fields"),
    (["insert", [{**REQ, "max_tokens": True}]], "wrong type"),
    (["insert", [{**REQ, "prompt_tokens": ["a"]}]], "prompt_tokens"),
])
def test_malformed_ops_are_refused(op: list[Any], needle: str) -> None:
    with pytest.raises(OpError, match=needle):
        check_op(op)


@pytest.mark.parametrize("frame", [b"\xc1", pack({"op": "step"}), pack([]), pack([3])])
def test_undecodable_messages_are_refused(frame: bytes) -> None:
    with pytest.raises(OpError):
        unpack(frame)


# ---- the checks -----------------------------------------------------------------------------------------

def test_a_stall_is_an_operation_past_its_bound() -> None:
    clock = FakeClock()
    stall = StallCheck(clock, 10.0)
    assert stall.stalled() == ""
    with stall.busy("step"):
        clock.advance(10.0)
        assert stall.stalled() == ""
        clock.advance(0.5)
        assert "step has run 10.5s" in stall.stalled()
    assert stall.stalled() == ""  # idle is never a stall
    clock.advance(100.0)
    assert stall.stalled() == ""
    with stall.busy("forming", limit_s=200.0):
        clock.advance(150.0)
        assert stall.stalled() == ""


def test_a_follower_whose_beats_stop_is_silent() -> None:
    clock = FakeClock()
    beats = BeatTracker(clock, [1, 2], timeout_s=3.0)
    clock.advance(2.0)
    beats.beat(1)
    beats.beat(9)  # not a member: ignored
    assert beats.silent() == []
    clock.advance(1.5)
    assert beats.silent() == [2]
    beats.beat(2)
    assert beats.silent() == []


def test_the_ledger_checks_every_follower_on_every_step() -> None:
    ledger = StepLedger(frozenset({1, 2}))
    ledger.record(1, 111)
    ledger.record(2, 222)
    ledger.report(1, 1, 111)
    ledger.report(2, 1, 111)
    assert ledger.checked == 1 and list(ledger.pending) == [2]
    ledger.report(2, 2, 222)
    with pytest.raises(GroupLost, match="already reported"):
        ledger.report(2, 2, 222)
    with pytest.raises(GroupLost, match="different tokens"):
        ledger.report(1, 2, 999)
    with pytest.raises(GroupLost, match="has not run"):
        ledger.report(1, 7, 1)


# ---- config, budget, status -------------------------------------------------------------------------

def test_a_groups_bounds_come_from_the_fleet_settings() -> None:
    cfg = dataclasses.replace(FleetConfig(), hung_step_s=7.0, ready_timeout_s=90.0, heartbeat_interval_s=0.5,
                              heartbeat_liveness=4)
    rank = ShardRank(0, RING, **shard_bounds(cfg, "tensor"))
    assert (rank.mode, rank.op_timeout_s, rank.start_timeout_s, rank.beat_timeout_s) == ("tensor", 7.0, 90.0, 4.0)


def test_shards_come_from_toml_and_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[[models]]\nname = "a"\nsource = "demo"\nshards = 2\nshard_mode = "tensor"\n'
                    '[[models]]\nname = "b"\nsource = "demo"\n')
    cfg = load_config(path, env={}, shards={"b": 3})
    assert [(m.name, m.shards, m.shard_mode) for m in cfg.models] == [("a", 2, "tensor"), ("b", 3, "auto")]


@pytest.mark.parametrize(("toml", "shards", "needle"), [
    (None, {"nope": 2}, "--shards nope=2: no model named 'nope'"),
    (None, {"demo": 0}, "shards must be in 1..64"),
    ('[[models]]\nname = "a"\nsource = "demo"\nshard_mode = "data"\n', None, "shard_mode must be one of"),
    ('[[models]]\nname = "a"\nsource = "demo"\nshards = "two"\n', None, "shards"),
])
def test_bad_shard_settings_name_the_setting(tmp_path: Path, toml: str | None, shards: Any, needle: str) -> None:
    path = None
    if toml is not None:
        path = tmp_path / "f.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError, match=needle):
        load_config(path, env={}, shards=shards)


def test_the_budget_counts_each_rank_its_share() -> None:
    assert per_rank_bytes(1000, 2) == 500 and per_rank_bytes(1001, 2) == 501 and per_rank_bytes(None, 2) is None
    # 2 ranks x 500 fit where 2 x 1000 (the whole weights per rank) would not.
    assert budget_verdict(budget_bytes=1200, loaded_bytes=0, each_bytes=500, replicas=1, what="x", ranks=2) == ""
    refused = budget_verdict(budget_bytes=1200, loaded_bytes=300, each_bytes=500, replicas=1, what="x", ranks=2)
    assert "1 x 2 ranks x" in refused


def test_a_sharded_replica_is_one_child_with_its_ranks_in_the_view() -> None:
    from actors.children import ChildSpec, Children, WorkerSpec
    from actors.model_manager import ModelManager

    ranks = [FakeProcess(20), FakeProcess(21)]
    children = Children(lambda spec: ProcessGroup(ranks, host="h"), FakeClock())
    cfg = dataclasses.replace(FleetConfig(), models=(ModelSpec("a", "demo", 1, shards=2),), memory_budget_bytes=1500)
    manager = ModelManager(cfg, children, check_source=lambda s: None, weights_bytes=lambda s: 1000)
    assert manager.startup_problem() == ""  # 2 ranks x 500, not 2 x 1000
    manager.add_configured()
    children.start_all()
    (child,) = children.workers("a")
    # Its two ranks share this machine's memory: "auto" capacity gives each half.
    assert child.spec == ChildSpec.for_worker(WorkerSpec("a-0", "a", "demo", shards=2, memory_share=2))
    view = child.view(0.0)
    assert view["pid"] == 20 and view["ranks"] == [{"rank": 0, "pid": 20, "host": "h"}, {"rank": 1, "pid": 21, "host": "h"}]
    assert manager.memory_view() == {"budget_bytes": 1500, "loaded_bytes": 1000}


def test_status_shows_a_group_as_one_replica_with_its_ranks() -> None:
    from mlx_fleet.cli_cluster import format_status

    ranks = [{"rank": 0, "pid": 11, "host": "h1"}, {"rank": 1, "pid": 12, "host": "h2"}]
    status = {"models": {"big": {"state": "ready", "queue_depth": 0, "running": 0, "on_demand": False,
                                 "workers": [{"worker_id": "big-0", "host": "h1", "pid": 11, "state": "ready",
                                              "in_flight": 0, "free": 16, "capacity": 16, "served": 1, "restarts": 0,
                                              "ranks": ranks, "info": {"shards": 2}}]}}}
    lines = format_status(status).splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.split() and ln.split()[0] == "big-0")
    assert lines[at + 1].split() == ["ranks:", "0", "pid", "11", "on", "h1,", "1", "pid", "12", "on", "h2"]


@pytest.mark.parametrize(("argv", "env", "needle"), [
    (["--shards", "2", "--rank", "1"], {}, "--rank needs --hostfile"),
    (["--hostfile", "HOSTS"], {}, "a sharded group: add --shards N"),
    (["--shards", "3", "--hostfile", "HOSTS"], {}, "lists 2 hosts"),
    (["--shards", "2", "--hostfile", "HOSTS", "--rank", "2"], {}, "expected 0..1"),
    (["--shards", "3"], {"MLX_RANK": "0", "MLX_HOSTFILE": "RING"}, "started a group of 2"),
    (["--shards", "2", "--shard-mode", "data"], {}, "invalid choice"),
])
def test_the_worker_command_refuses_a_group_it_cannot_form(tmp_path: Path, monkeypatch, capsys, argv: list[str],
                                                           env: dict[str, str], needle: str) -> None:
    from mlx_fleet.cli import main

    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]))
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([["127.0.0.1:1"], ["127.0.0.1:2"]]))
    for key, value in env.items():
        monkeypatch.setenv(key, value.replace("RING", str(ring)))
    argv = [a.replace("HOSTS", str(hosts)) for a in argv]
    try:
        code = main(["worker", "--connect", "ipc:///nowhere", "--model", "m=demo", *argv])
    except SystemExit as exc:  # argparse refuses a bad choice
        code = exc.code
    assert code == 2 and needle in capsys.readouterr().err
