"""Unit tests for the cluster's pure parts: settings, bind policy, keys, budget, status table."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq.auth

from actors.config import ConfigError, FleetConfig
from actors.config_load import load_config
from actors.curve import AuthorizedKeys, check_bind_policy, is_loopback, load_client_keys, make_keys
from actors.model_manager import budget_verdict
from mlx_fleet.cli import build_parser
from mlx_fleet.cli_cluster import format_status

pytestmark = pytest.mark.timeout(30)

MIB = 1024 * 1024


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- settings ---------------------------------------------------------------------


def test_models_tables_with_on_demand_and_cli_models(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "f.toml", """
memory_budget_bytes = 1000
[[models]]
name = "a"
source = "demo"
replicas = 2
[[models]]
name = "lazy"
source = "demo-small"
on_demand = true
idle_unload_s = 45
batching = { decode_capacity = 4 }
""")
    cfg = load_config(cfg_file, env={}, models=[("lazy", "/models/other"), ("c", "demo")])
    assert [(m.name, m.replicas, m.on_demand) for m in cfg.models] == [("a", 2, False), ("lazy", 1, True), ("c", 1, False)]
    lazy = cfg.model("lazy")
    # --model replaces the source of a TOML model and keeps the rest of its table.
    assert (lazy.source, lazy.idle_unload_s, lazy.batching.decode_capacity) == ("/models/other", 45.0, 4)
    assert cfg.memory_budget_bytes == 1000


@pytest.mark.parametrize(("toml", "needle"), [
    ('[[models]]\nname = "a"\nsource = "demo"\nidle_unload_s = 0\n', "idle_unload_s"),
    ('[[models]]\nname = "a"\nsource = "demo"\non_demand = "maybe"\n', "on_demand"),
    ('curve_server_secret = "x"\n', "curve_authorized_dir"),
    ('curve_authorized_dir = "x"\n', "curve_server_secret"),
    ('curve_client_secret = "x"\n', "curve_server_public"),
    ('memory_budget_bytes = -1\n', "memory_budget_bytes"),
    ('runtime_dir = "/tmp/x"\n', "unknown setting"),  # the supervisor's, not a user's
])
def test_bad_cluster_settings_name_the_setting(tmp_path: Path, toml: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path / "f.toml", toml), env={})


def test_cluster_environment_variables() -> None:
    env = {"MLX_FLEET_CURVE_SERVER_SECRET": "/k/broker.key_secret", "MLX_FLEET_CURVE_AUTHORIZED_DIR": "/k/authorized",
           "MLX_FLEET_MEMORY_BUDGET_BYTES": "2048"}
    cfg = load_config(None, env=env)
    assert (cfg.curve_server_secret, cfg.curve_authorized_dir, cfg.memory_budget_bytes) == (
        "/k/broker.key_secret", "/k/authorized", 2048)


# ---- bind policy ----------------------------------------------------------------------


@pytest.mark.parametrize(("addr", "loopback"), [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.8.9.1:1", True), ("tcp://[::1]:5555", True),
    ("tcp://localhost:5555", True), ("ipc:///tmp/x", True), ("inproc://x", True),
    ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://10.1.2.3:5555", False),
    ("tcp://eth0:5555", False), ("tcp://[::]:5555", False),
])
def test_is_loopback(addr: str, loopback: bool) -> None:
    assert is_loopback(addr) is loopback


def test_bind_policy() -> None:
    assert check_bind_policy(FleetConfig()) == []
    exposed = FleetConfig(backend="tcp://*:5556")
    with pytest.raises(ConfigError, match="--insecure"):
        check_bind_policy(exposed)
    (warning,) = check_bind_policy(FleetConfig(backend="tcp://*:5556", insecure=True))
    assert "tcp://*:5556" in warning and "WITHOUT" in warning
    assert check_bind_policy(FleetConfig(frontend="tcp://0.0.0.0:1", curve_server_secret="s", curve_authorized_dir="d")) == []


def test_up_flags_reach_the_config() -> None:
    from mlx_fleet.cli import config_from_args

    args = build_parser().parse_args(["up", "--backend", "tcp://*:5556", "--insecure", "--memory-budget-bytes", "99",
                                      "--model", "a=demo", "--model", "b=demo-small"])
    cfg = config_from_args(args)
    assert cfg.insecure and cfg.memory_budget_bytes == 99 and [m.name for m in cfg.models] == ["a", "b"]


# ---- keys --------------------------------------------------------------------------------


def test_make_keys_writes_pairs_and_authorises_all_but_the_broker(tmp_path: Path) -> None:
    made = make_keys(tmp_path)
    assert set(made) == {"broker", "client", "worker"}
    assert sorted(p.name for p in (tmp_path / "authorized").iterdir()) == ["client.key", "worker.key"]
    assert (made["client"][1].stat().st_mode & 0o777) == 0o600
    keys = load_client_keys(str(made["client"][1]), str(made["broker"][0]))
    assert keys["server"] == zmq.auth.load_certificate(made["broker"][0])[0]
    with pytest.raises(FileExistsError):
        make_keys(tmp_path, ("client",))
    with pytest.raises(ConfigError, match="no secret key"):
        load_client_keys(str(made["client"][0]), str(made["broker"][0]))


def test_authorized_keys_follow_the_folder(tmp_path: Path) -> None:
    made = make_keys(tmp_path / "k")
    folder = tmp_path / "k" / "authorized"
    extra = b"E" * 40
    auth = AuthorizedKeys(str(folder), {extra})
    client = zmq.auth.load_certificate(made["client"][0])[0]
    broker = zmq.auth.load_certificate(made["broker"][0])[0]
    assert auth.callback("*", client) and auth.callback("*", extra) and not auth.callback("*", broker)
    (folder / "client.key").unlink()
    assert not auth.callback("*", client)  # a removed key is out at the next handshake
    (folder / "broker.key").write_bytes(made["broker"][0].read_bytes())
    assert auth.callback("*", broker)
    (folder / "bad.key").write_text("not a certificate")
    assert auth.callback("*", broker)  # a broken file keeps the last good set


# ---- budget and estimate ------------------------------------------------------------------


@pytest.mark.parametrize(("budget", "loaded", "each", "replicas", "refused"), [
    (0, 10**12, 10**12, 4, False),  # no budget
    (100 * MIB, 0, 50 * MIB, 2, False),  # exactly fits
    (100 * MIB, 1, 50 * MIB, 2, True),
    (100 * MIB, 60 * MIB, 30 * MIB, 1, False),
    (100 * MIB, 60 * MIB, 30 * MIB, 2, True),
    (100 * MIB, 0, None, 1, True),  # unknown size with a budget
    (100 * MIB, 0, None, 0, False),  # nothing to start
])
def test_budget_verdict(budget: int, loaded: int, each: int | None, replicas: int, refused: bool) -> None:
    text = budget_verdict(budget_bytes=budget, loaded_bytes=loaded, each_bytes=each, replicas=replicas, what="load x")
    assert bool(text) is refused
    if refused:
        assert text.startswith("load x refused") and "memory_budget_bytes" in text


def test_weights_bytes_sums_safetensors(tmp_path: Path) -> None:
    from workers.models.sources import check_source, weights_bytes

    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"x" * 24)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 5000)
    assert weights_bytes(str(tmp_path)) == 1024
    assert weights_bytes(str(tmp_path / "missing")) is None
    assert weights_bytes("nobody/not-cached-anywhere") is None
    with pytest.raises(FileNotFoundError):
        check_source(str(tmp_path / "missing"))
    check_source("owner/name")  # a hub id is fine until a worker tries it


# ---- status table --------------------------------------------------------------------------


def test_status_table_shows_replicas_state_and_blas() -> None:
    status = {
        "models": {
            "chat": {"state": "ready", "queue_depth": 3, "running": 2, "on_demand": False, "idle_unload_s": None,
                     "workers": [{"worker_id": "chat-0", "host": "h1", "pid": 11, "state": "ready", "in_flight": 2,
                                  "free": 2, "capacity": 4, "served": 9, "restarts": 1,
                                  "info": {"blas": {"name": "openblas", "path": "/x/libopenblas.so"},
                                           "precision": "quantized 4/8-bit"}},
                                 {"worker_id": "chat-1", "host": "-", "pid": 12, "state": "starting", "in_flight": 0,
                                  "free": 0, "capacity": 0, "served": 0, "restarts": 0, "info": {}}]},
            "lazy": {"state": "cold", "queue_depth": 0, "running": 0, "on_demand": True, "idle_unload_s": 60.0,
                     "workers": []},
        },
        "counters": {"accepted": 5},
        "supervisor": {"memory": {"budget_bytes": 2 * MIB, "loaded_bytes": MIB}},
    }
    text = format_status(status)
    assert "chat-0" in text and "openblas" in text and "chat-1" in text and "starting" in text
    (row,) = [ln for ln in text.splitlines() if ln.split() and ln.split()[0] == "chat-0"]
    assert row.split()[-3:] == ["quantized", "4/8-bit", "openblas"]
    assert "idle stop 60s" in text and "1.0 MiB of weights loaded, budget 2.0 MiB" in text
    assert "BLAS in use: openblas (/x/libopenblas.so)" in text


def test_constructing_a_supervisor_has_no_side_effects() -> None:
    from mlx_fleet.wiring import make_supervisor

    before = set(Path("/tmp").glob("mlxf-run-*"))
    sup = make_supervisor(load_config(env={}, overrides={"memory_budget_bytes": 1}))
    assert sup.link is None and sup.child_cfg is None  # no folder, no socket until start()
    assert all(c.process is None for c in sup.children)
    assert set(Path("/tmp").glob("mlxf-run-*")) == before
    sup.shutdown()  # safe when never opened

