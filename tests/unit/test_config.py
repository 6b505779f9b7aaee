"""Unit tests for actors.config: precedence, the seed's env vars, models and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.config import BatchingConfig, ConfigError, FleetConfig, ModelSpec, parse_bool
from actors.config_load import load_config, parse_model_arg

pytestmark = pytest.mark.timeout(10)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, toml: str | None = None, **kwargs: Any) -> FleetConfig:
    """load_config isolated from the real environment unless ``env`` is given."""
    kwargs.setdefault("env", {})
    path = write_toml(tmp_path, toml) if toml is not None else None
    return load_config(path, **kwargs)


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.frontend == "tcp://127.0.0.1:5555"
    assert cfg.metrics_port == 9464 and cfg.metrics_export is True and cfg.metrics_host == "127.0.0.1"
    assert cfg.batching == BatchingConfig()
    assert cfg.batching.policy == "fixed" and cfg.batching.window_ms == 1.0 and cfg.batching.fast_path
    assert not cfg.batching.auto_tune
    assert cfg.models == (ModelSpec("demo", "demo", 1, BatchingConfig()),)


# ---- precedence: CLI > env > TOML > default --------------------------------------------

PRECEDENCE = [
    # (setting, TOML text, env var, env value, CLI value, expected per layer [default, toml, env, cli])
    ("window_ms", "[batching]\nwindow_ms = 2.5\n", "MLX_GPU_SCHEDULER_WINDOW_MS", "3.5", 4.5, [1.0, 2.5, 3.5, 4.5]),
    ("window_ms", "window_ms = 2\n", "MLX_GPU_SCHEDULER_WINDOW_MS", "3", 4, [1.0, 2.0, 3.0, 4.0]),
    ("admission_batch", "[batching]\nadmission_batch = 4\n", "MLX_GPU_SCHEDULER_BATCH_SIZE", "6", 12, [8, 4, 6, 12]),
    ("prefill_first_tokens", "[batching]\nprefill_first_tokens = 1024\n", "MLX_FLEET_PREFILL_FIRST_TOKENS", "512", 0,
     [2048, 1024, 512, 0]),
    ("metrics_port", "[fleet]\nmetrics_port = 9100\n", "MLX_METRICS_PORT", "9200", 9300, [9464, 9100, 9200, 9300]),
    ("metrics_export", "metrics_export = false\n", "MLX_METRICS_EXPORT", "on", False, [True, False, True, False]),
    ("fast_path", "[batching]\nfast_path = false\n", "MLX_FAST_PATH", "on", False, [True, False, True, False]),
    ("frontend", "[fleet]\nfrontend = \"ipc:///tmp/a\"\n", "MLX_FLEET_FRONTEND", "ipc:///tmp/b", "ipc:///tmp/c",
     ["tcp://127.0.0.1:5555", "ipc:///tmp/a", "ipc:///tmp/b", "ipc:///tmp/c"]),
    ("queue_limit", "queue_limit = 10\n", "MLX_FLEET_QUEUE_LIMIT", "20", 30, [1024, 10, 20, 30]),
    ("dtype", "dtype = \"quantized\"\n", "MLX_FLEET_DTYPE", "bfloat16", "float32",
     ["auto", "quantized", "bfloat16", "float32"]),
]


def _get(cfg: FleetConfig, name: str) -> Any:
    return getattr(cfg.batching, name) if hasattr(cfg.batching, name) else getattr(cfg, name)


@pytest.mark.parametrize(("name", "toml", "var", "env_value", "cli_value", "expected"), PRECEDENCE)
def test_precedence(
    tmp_path: Path, name: str, toml: str, var: str, env_value: str, cli_value: Any, expected: list[Any]
) -> None:
    env = {var: env_value}
    cli = {name: cli_value}
    layers = [
        load(tmp_path),
        load(tmp_path, toml),
        load(tmp_path, toml, env=env),
        load(tmp_path, toml, env=env, overrides=cli),
    ]
    assert [_get(cfg, name) for cfg in layers] == expected
    # Each layer alone also beats the default.
    assert _get(load(tmp_path, env=env), name) == expected[2]
    assert _get(load(tmp_path, overrides=cli), name) == expected[3]


def test_cli_none_does_not_override(tmp_path: Path) -> None:
    cfg = load(tmp_path, "window_ms = 2.0\n", env={"MLX_GPU_SCHEDULER_WINDOW_MS": "3.0"}, overrides={"window_ms": None})
    assert cfg.batching.window_ms == 3.0


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_GPU_SCHEDULER_WINDOW_MS", "7.5")
    assert load_config(None).batching.window_ms == 7.5


# ---- the seed's environment variables ---------------------------------------------------

SEED_ENV = [
    ({"MLX_GPU_SCHEDULER": "off"}, {"policy": "immediate"}),
    ({"MLX_GPU_SCHEDULER": "0"}, {"policy": "immediate"}),
    ({"MLX_GPU_SCHEDULER": "on"}, {"policy": "fixed"}),
    ({"MLX_GPU_SCHEDULER": "TRUE"}, {"policy": "fixed"}),
    ({"MLX_ADAPTIVE_WINDOW": "on"}, {"policy": "adaptive"}),
    ({"MLX_ADAPTIVE_WINDOW": "1", "MLX_GPU_SCHEDULER": "on"}, {"policy": "adaptive"}),
    ({"MLX_ADAPTIVE_WINDOW": "off"}, {"policy": "fixed"}),
    ({"MLX_ADAPTIVE_WINDOW": "on", "MLX_GPU_SCHEDULER": "off"}, {"policy": "immediate"}),  # off wins
    ({"MLX_FAST_PATH": "off"}, {"fast_path": False}),
    ({"MLX_FAST_PATH": "no"}, {"fast_path": False}),
    ({"MLX_FAST_PATH": "yes"}, {"fast_path": True}),
    ({"MLX_FLEET_SOLO_FAST_PATH": "0"}, {"solo_fast_path": False}),
    ({"MLX_FLEET_SOLO_FAST_PATH": "on"}, {"solo_fast_path": True}),
    (
        {"MLX_ADAPTIVE_WINDOW_LOW_MS": "0.5", "MLX_ADAPTIVE_WINDOW_MEDIUM_MS": "1.5", "MLX_ADAPTIVE_WINDOW_HIGH_MS": "3"},
        {"adaptive_low_ms": 0.5, "adaptive_medium_ms": 1.5, "adaptive_high_ms": 3.0},
    ),
    ({"MLX_AUTO_TUNE": "on"}, {"auto_tune": True}),
    (
        {
            "MLX_AUTO_TUNE": "1", "MLX_AUTO_TUNE_MIN_BATCH": "3", "MLX_AUTO_TUNE_MAX_BATCH": "12",
            "MLX_AUTO_TUNE_EMA_ALPHA": "0.5", "MLX_AUTO_TUNE_INTERVAL": "20",
        },
        {
            "auto_tune": True, "auto_tune_min_batch": 3, "auto_tune_max_batch": 12,
            "auto_tune_ema_alpha": 0.5, "auto_tune_interval": 20,
        },
    ),
    ({"MLX_GPU_SCHEDULER_P99_THRESHOLD_MS": "250"}, {"p99_threshold_ms": 250.0}),
    ({"MLX_GPU_SCHEDULER_BATCH_SIZE": "4"}, {"admission_batch": 4}),
    ({"MLX_FLEET_DECODE_CAPACITY": "32"}, {"decode_capacity": 32}),
    ({"MLX_FLEET_DECODE_CAPACITY": "auto"}, {"decode_capacity": "auto"}),
    ({"MLX_FLEET_DECODE_CAPACITY": " AUTO "}, {"decode_capacity": "auto"}),
    ({}, {"decode_capacity": "auto", "decode_capacity_max": 64, "kv_memory_fraction": 0.5, "routing": "cache_aware",
          "routing_min_match": 0.5, "routing_balance_abs": 8, "routing_balance_rel": 1.5}),
    ({"MLX_FLEET_DECODE_CAPACITY_MAX": "128", "MLX_FLEET_KV_MEMORY_FRACTION": "0.25"},
     {"decode_capacity_max": 128, "kv_memory_fraction": 0.25}),
    ({"MLX_FLEET_ROUTING": "least_loaded"}, {"routing": "least_loaded"}),
    ({"MLX_METRICS_PORT": "9555"}, {"metrics_port": 9555}),
    ({"MLX_METRICS_PORT": " 9555 "}, {"metrics_port": 9555}),
    ({"MLX_METRICS_EXPORT": "off"}, {"metrics_export": False}),
    ({"MLX_METRICS_EXPORT": "false"}, {"metrics_export": False}),
    ({"MLX_FLEET_LOG_LEVEL": "DEBUG", "MLX_FLEET_BLAS": "none"}, {"log_level": "DEBUG", "blas": "none"}),
    ({"UNRELATED": "x", "MLX_SOMETHING_ELSE": "y"}, {}),  # unknown variables are not ours to judge
]


@pytest.mark.parametrize(("env", "expected"), SEED_ENV)
def test_seed_env(tmp_path: Path, env: dict[str, str], expected: dict[str, Any]) -> None:
    cfg = load(tmp_path, env=env)
    for name, value in expected.items():
        assert _get(cfg, name) == value, name
    # The models inherit the global batching.
    assert cfg.models[0].batching == cfg.batching


def test_scheduler_env_overrides_toml_policy(tmp_path: Path) -> None:
    toml = "[batching]\npolicy = \"adaptive\"\n"
    assert load(tmp_path, toml).batching.policy == "adaptive"
    assert load(tmp_path, toml, env={"MLX_GPU_SCHEDULER": "off"}).batching.policy == "immediate"
    assert load(tmp_path, toml, env={"MLX_GPU_SCHEDULER": "off"}, overrides={"policy": "fixed"}).batching.policy == "fixed"


# ---- models --------------------------------------------------------------------------------

MODELS_TOML = """
[batching]
window_ms = 2.0

[[models]]
name = "a"
source = "/models/a"
replicas = 2

[[models]]
name = "b"
source = "org/b-4bit"
[models.batching]
policy = "immediate"
decode_capacity = 4
"""


def test_toml_models_with_per_model_batching(tmp_path: Path) -> None:
    cfg = load(tmp_path, MODELS_TOML)
    assert [m.name for m in cfg.models] == ["a", "b"]
    a, b = cfg.model("a"), cfg.model("b")
    assert (a.source, a.replicas) == ("/models/a", 2)
    assert a.batching == cfg.batching and a.batching.window_ms == 2.0
    assert (b.source, b.replicas) == ("org/b-4bit", 1)
    assert (b.batching.policy, b.batching.decode_capacity) == ("immediate", 4)
    assert b.batching.window_ms == 2.0  # the rest comes from the global batching
    assert cfg.batching.policy == "fixed" and cfg.batching.decode_capacity == "auto"
    with pytest.raises(KeyError):
        cfg.model("c")


def test_per_model_batching_builds_on_env(tmp_path: Path) -> None:
    cfg = load(tmp_path, MODELS_TOML, env={"MLX_FAST_PATH": "off"})
    assert not cfg.model("a").batching.fast_path and not cfg.model("b").batching.fast_path


@pytest.mark.parametrize(
    ("toml", "models", "replicas", "expected"),
    [
        (None, None, None, [("demo", "demo", 1)]),
        (None, [("a", "demo")], None, [("a", "demo", 1)]),
        (None, [("a", "demo")], {"a": 2}, [("a", "demo", 2)]),
        (None, [("a", "demo"), ("b", "/m/b")], {"b": 3}, [("a", "demo", 1), ("b", "/m/b", 3)]),
        (None, None, {"demo": 2}, [("demo", "demo", 2)]),
        (None, [("a", "x")], {"a": 0}, [("a", "x", 0)]),
        (MODELS_TOML, [("a", "/other/a")], None, [("a", "/other/a", 2), ("b", "org/b-4bit", 1)]),
        (MODELS_TOML, [("c", "demo")], {"b": 5}, [("a", "/models/a", 2), ("b", "org/b-4bit", 5), ("c", "demo", 1)]),
    ],
)
def test_cli_models_and_replicas(
    tmp_path: Path, toml: str | None, models: Any, replicas: Any, expected: list[tuple[str, str, int]]
) -> None:
    cfg = load(tmp_path, toml, models=models, replicas=replicas)
    assert [(m.name, m.source, m.replicas) for m in cfg.models] == expected


def test_cli_model_keeps_toml_batching(tmp_path: Path) -> None:
    cfg = load(tmp_path, MODELS_TOML, models=[("b", "/local/b")])
    assert cfg.model("b").source == "/local/b"
    assert cfg.model("b").batching.policy == "immediate"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=demo", ("a", "demo")),
        ("llama=mlx-community/Llama-3.2-1B-Instruct-4bit", ("llama", "mlx-community/Llama-3.2-1B-Instruct-4bit")),
        ("m=/path/with=equals", ("m", "/path/with=equals")),
        ("/models/qwen", ("qwen", "/models/qwen")),
        ("org/model", ("model", "org/model")),
        ("demo", ("demo", "demo")),
    ],
)
def test_parse_model_arg(text: str, expected: tuple[str, str]) -> None:
    assert parse_model_arg(text) == expected


@pytest.mark.parametrize("text", ["=demo", "a=", "="])
def test_parse_model_arg_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_model_arg(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("on", True), ("Yes", True), (" TRUE ", True), (True, True),
     ("0", False), ("off", False), ("No", False), ("false", False), (False, False)],
)
def test_parse_bool(text: Any, expected: bool) -> None:
    assert parse_bool(text) is expected


# ---- errors --------------------------------------------------------------------------------

ERRORS: list[tuple[str, dict[str, Any]]] = [
    # env
    ("env-bad-float", {"env": {"MLX_GPU_SCHEDULER_WINDOW_MS": "fast"}}),
    ("env-bad-int", {"env": {"MLX_METRICS_PORT": "ninety"}}),
    ("env-float-for-int", {"env": {"MLX_GPU_SCHEDULER_BATCH_SIZE": "2.5"}}),
    ("env-bad-bool", {"env": {"MLX_FAST_PATH": "maybe"}}),
    ("env-bad-scheduler", {"env": {"MLX_GPU_SCHEDULER": "sometimes"}}),
    ("env-bad-adaptive", {"env": {"MLX_ADAPTIVE_WINDOW": "2"}}),
    ("env-port-range", {"env": {"MLX_METRICS_PORT": "70000"}}),
    ("env-negative-window", {"env": {"MLX_GPU_SCHEDULER_WINDOW_MS": "-1"}}),
    ("env-nan-window", {"env": {"MLX_GPU_SCHEDULER_WINDOW_MS": "nan"}}),
    ("env-inf-window", {"env": {"MLX_GPU_SCHEDULER_WINDOW_MS": "inf"}}),
    ("env-alpha-zero", {"env": {"MLX_AUTO_TUNE_EMA_ALPHA": "0"}}),
    ("env-min-over-max", {"env": {"MLX_AUTO_TUNE_MIN_BATCH": "9", "MLX_AUTO_TUNE_MAX_BATCH": "4"}}),
    ("env-interval-zero", {"env": {"MLX_AUTO_TUNE_INTERVAL": "0"}}),
    ("env-capacity-zero", {"env": {"MLX_FLEET_DECODE_CAPACITY": "0"}}),
    ("env-capacity-word", {"env": {"MLX_FLEET_DECODE_CAPACITY": "lots"}}),
    ("env-capacity-fraction", {"env": {"MLX_FLEET_DECODE_CAPACITY": "2.5"}}),
    ("env-capacity-max-zero", {"env": {"MLX_FLEET_DECODE_CAPACITY_MAX": "0"}}),
    ("env-kv-fraction-zero", {"env": {"MLX_FLEET_KV_MEMORY_FRACTION": "0"}}),
    ("env-kv-fraction-over-one", {"env": {"MLX_FLEET_KV_MEMORY_FRACTION": "1.5"}}),
    ("env-bad-routing", {"env": {"MLX_FLEET_ROUTING": "random"}}),
    ("cli-balance-rel-under-one", {"overrides": {"routing_balance_rel": 0.5}}),
    ("cli-balance-abs-negative", {"overrides": {"routing_balance_abs": -1}}),
    ("cli-min-match-over-one", {"overrides": {"routing_min_match": 1.5}}),
    # CLI
    ("cli-unknown-key", {"overrides": {"windw_ms": 1.0}}),
    ("cli-bad-policy", {"overrides": {"policy": "eager"}}),
    ("cli-bool-for-int", {"overrides": {"metrics_port": True}}),
    ("cli-bool-for-float", {"overrides": {"window_ms": True}}),
    ("cli-heartbeat-zero", {"overrides": {"heartbeat_interval_s": 0}}),
    ("cli-liveness-zero", {"overrides": {"heartbeat_liveness": 0}}),
    ("cli-admission-zero", {"overrides": {"admission_batch": 0}}),
    ("cli-replicas-unknown-model", {"replicas": {"nope": 2}}),
    ("cli-replicas-unknown-with-models", {"models": [("a", "demo")], "replicas": {"b": 2}}),
    ("cli-replicas-negative", {"models": [("a", "demo")], "replicas": {"a": -1}}),
    ("cli-replicas-huge", {"models": [("a", "demo")], "replicas": {"a": 65}}),
]


@pytest.mark.parametrize("kwargs", [k for _, k in ERRORS], ids=[i for i, _ in ERRORS])
def test_errors(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path, **kwargs)


TOML_ERRORS = [
    ("syntax", "window_ms = = 1\n"),
    ("unknown-top-level", "windowms = 1.0\n"),
    ("unknown-in-fleet", "[fleet]\nfrontnd = \"tcp://x\"\n"),
    ("unknown-in-batching", "[batching]\nwindow = 1.0\n"),
    ("unknown-table", "[server]\nport = 1\n"),
    ("bad-type-float", "[batching]\nwindow_ms = \"soon\"\n"),
    ("bad-type-bool", "[batching]\nfast_path = \"perhaps\"\n"),
    ("bad-type-int", "queue_limit = \"lots\"\n"),
    ("bool-for-int", "metrics_port = true\n"),
    ("fractional-int", "queue_limit = 2.5\n"),
    ("inf-int", "queue_limit = inf\n"),
    ("nan-int", "metrics_port = nan\n"),
    ("bad-policy", "[batching]\npolicy = \"eager\"\n"),
    ("window-too-big", "[batching]\nwindow_ms = 20000.0\n"),
    ("port-negative", "metrics_port = -1\n"),
    ("client-hwm-zero", "client_hwm = 0\n"),
    ("client-sndbuf-negative", "client_sndbuf_bytes = -1\n"),
    ("models-not-array", "models = \"a\"\n"),
    ("models-no-source", "[[models]]\nname = \"a\"\n"),
    ("models-no-name", "[[models]]\nsource = \"demo\"\n"),
    ("models-name-int", "[[models]]\nname = 1\nsource = \"demo\"\n"),
    ("models-unknown-key", "[[models]]\nname = \"a\"\nsource = \"demo\"\nreplica = 2\n"),
    ("models-bad-replicas", "[[models]]\nname = \"a\"\nsource = \"demo\"\nreplicas = \"two\"\n"),
    ("models-replicas-range", "[[models]]\nname = \"a\"\nsource = \"demo\"\nreplicas = 100\n"),
    ("models-batching-unknown", "[[models]]\nname = \"a\"\nsource = \"demo\"\n[models.batching]\nwindw_ms = 1.0\n"),
    ("models-batching-bad-value", "[[models]]\nname = \"a\"\nsource = \"demo\"\n[models.batching]\npolicy = \"x\"\n"),
    ("models-batching-not-table", "[[models]]\nname = \"a\"\nsource = \"demo\"\nbatching = 5\n"),
    ("models-batching-fleet-key", "[[models]]\nname = \"a\"\nsource = \"demo\"\n[models.batching]\nmetrics_port = 1\n"),
]


@pytest.mark.parametrize("toml", [t for _, t in TOML_ERRORS], ids=[i for i, _ in TOML_ERRORS])
def test_toml_errors(tmp_path: Path, toml: str) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path, toml)


def test_decode_capacity_is_auto_or_a_number_in_the_file(tmp_path: Path) -> None:
    cfg = load(tmp_path, "[batching]\ndecode_capacity = \"auto\"\n\n[[models]]\nname = \"a\"\nsource = \"demo\"\n"
                         "batching = { decode_capacity = 12 }\n")
    assert cfg.batching.decode_capacity == "auto" and cfg.models[0].batching.decode_capacity == 12
    with pytest.raises(ConfigError, match=r"decode_capacity.*auto.*fleet\.toml"):
        load(tmp_path, "[batching]\ndecode_capacity = \"many\"\n")


def test_whole_float_is_an_int(tmp_path: Path) -> None:
    cfg = load(tmp_path, "queue_limit = 16.0\n")
    assert cfg.queue_limit == 16 and isinstance(cfg.queue_limit, int)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(tmp_path / "nope.toml", env={})


def test_error_names_setting_and_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"window_ms.*environment"):
        load(tmp_path, env={"MLX_GPU_SCHEDULER_WINDOW_MS": "fast"})
    with pytest.raises(ConfigError, match=r"window_ms.*fleet\.toml"):
        load(tmp_path, "window_ms = \"fast\"\n")
    with pytest.raises(ConfigError, match=r"windw_ms.*command line"):
        load(tmp_path, overrides={"windw_ms": 1})


# ---- dtype: the fleet's default, per model in TOML ----------------------------------------

DTYPE_CASES = [
    # (TOML, env, CLI dtype, CLI models, expected {model: dtype})
    (None, {}, None, [], {"demo": "auto"}),
    (None, {"MLX_FLEET_DTYPE": "float16"}, None, [("a", "x")], {"a": "float16"}),
    ("dtype = \"float32\"\n[[models]]\nname = \"a\"\nsource = \"x\"\n[[models]]\nname = \"b\"\nsource = \"y\"\n"
     "dtype = \"quantized\"\n", {}, None, [], {"a": "float32", "b": "quantized"}),
    ("[[models]]\nname = \"b\"\nsource = \"y\"\ndtype = \"quantized\"\n", {}, "bfloat16", [("b", "z"), ("c", "w")],
     {"b": "quantized", "c": "bfloat16"}),
]


@pytest.mark.parametrize(("toml", "env", "cli", "models", "expected"), DTYPE_CASES)
def test_model_dtype(tmp_path: Path, toml: str | None, env: dict[str, str], cli: str | None,
                     models: list[tuple[str, str]], expected: dict[str, str]) -> None:
    cfg = load(tmp_path, toml, env=env, overrides={"dtype": cli}, models=models)
    assert {m.name: m.dtype for m in cfg.models} == expected


@pytest.mark.parametrize(("toml", "env"), [
    (None, {"MLX_FLEET_DTYPE": "int8"}),
    ("dtype = \"fp32\"\n", {}),
    ("[[models]]\nname = \"a\"\nsource = \"x\"\ndtype = \"q4\"\n", {}),
])
def test_bad_dtype_is_refused(tmp_path: Path, toml: str | None, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="dtype.*auto, quantized, float32, bfloat16, float16"):
        load(tmp_path, toml, env=env)


def test_recovery_settings_come_from_the_file_and_bad_values_are_refused(tmp_path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text("recovery_grace_s = 4.5\nrecovery_buffer_bytes = 1024\nadoption_window_s = 1\n"
                    "client_return_s = 20\nrestart_stable_s = 3\n")
    cfg = load_config(path, env={})
    assert (cfg.recovery_grace_s, cfg.recovery_buffer_bytes, cfg.adoption_window_s, cfg.client_return_s,
            cfg.restart_stable_s) == (4.5, 1024, 1.0, 20.0, 3.0)
    defaults = load_config(env={})
    assert (defaults.recovery_grace_s, defaults.recovery_buffer_bytes, defaults.adoption_window_s) == (
        10.0, 64 * 1024 * 1024, 3.0)
    for bad in ("recovery_grace_s = -1", "recovery_buffer_bytes = -1", "adoption_window_s = -0.5"):
        path.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=bad.split()[0]):
            load_config(path, env={})


def test_the_readmes_capacity_and_routing_settings_load_as_shown(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"^```toml\n(.*?)^```", readme, flags=re.M | re.S)
              if "kv_tokens_per_sequence" in b or "routing_min_match" in b]
    assert len(blocks) == 2
    cfg = load(tmp_path, "\n".join(blocks))
    assert (cfg.batching.decode_capacity, cfg.batching.decode_capacity_max, cfg.batching.kv_memory_fraction,
            cfg.batching.kv_tokens_per_sequence) == ("auto", 64, 0.5, 1280)
    assert (cfg.routing, cfg.routing_min_match, cfg.routing_balance_abs, cfg.routing_balance_rel) == (
        "cache_aware", 0.5, 8, 1.5)
