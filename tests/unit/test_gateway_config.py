"""Gateway settings: config keys, environment, CLI flags and the supervisor's child list (no processes)."""

from __future__ import annotations

import pytest

from actors.config import ConfigError
from actors.config_load import load_config
from mlx_fleet.gateway.server import GatewaySettings
from mlx_fleet.cli import build_parser, config_from_args
from mlx_fleet.wiring import make_supervisor


def test_defaults_bind_loopback_port_8000_without_a_key():
    cfg = load_config(env={})
    assert (cfg.http_host, cfg.http_port, cfg.api_key) == ("127.0.0.1", 8000, "")


@pytest.mark.parametrize("env, overrides, want_port, want_key", [
    ({"MLX_FLEET_API_KEY": "k1"}, {}, 8000, "k1"),
    ({"MLX_FLEET_HTTP_PORT": "9001"}, {}, 9001, ""),
    ({"MLX_FLEET_HTTP_PORT": "9001", "MLX_FLEET_API_KEY": "k1"}, {"http_port": 0, "api_key": "k2"}, 0, "k2"),
])
def test_environment_and_overrides(env, overrides, want_port, want_key):
    cfg = load_config(env=env, overrides=overrides)
    assert (cfg.http_port, cfg.api_key) == (want_port, want_key)


def test_api_key_stays_out_of_reprs():
    cfg = load_config(env={"MLX_FLEET_API_KEY": "very-secret"})
    assert "very-secret" not in repr(cfg)
    assert "very-secret" not in repr(GatewaySettings.from_config(cfg))


@pytest.mark.parametrize("overrides", [{"http_port": 70000}, {"http_port": -1}, {"no_worker_timeout_s": 0}])
def test_bad_values_are_config_errors(overrides):
    with pytest.raises(ConfigError):
        load_config(env={}, overrides=overrides)


def test_cli_flags(monkeypatch):
    monkeypatch.delenv("MLX_FLEET_API_KEY", raising=False)
    args = build_parser().parse_args(["up", "--http-port", "8123", "--http-host", "::1", "--api-key", "k"])
    cfg = config_from_args(args)
    assert (cfg.http_host, cfg.http_port, cfg.api_key) == ("::1", 8123, "k")


@pytest.mark.parametrize("port, want", [(8000, True), (0, False)])
def test_supervisor_adds_the_gateway_unless_port_is_0(port, want):
    sup = make_supervisor(load_config(env={}, overrides={"http_port": port}))
    assert ("gateway" in [c.kind for c in sup.children]) is want


def test_gateway_settings_follow_the_fleet():
    cfg = load_config(env={}, overrides={"frontend": "tcp://*:5600", "request_timeout_s": 30.0})
    s = GatewaySettings.from_config(cfg)
    assert (s.connect, s.request_timeout_s, s.port) == ("tcp://127.0.0.1:5600", 30.0, 8000)
