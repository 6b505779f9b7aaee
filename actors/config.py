"""Configuration: defaults < TOML file < environment variables < CLI flags.

Every setting has one flat name (``window_ms``, ``frontend``...). A TOML file
may hold them at the top level or in ``[fleet]`` / ``[batching]`` tables, plus
``[[models]]`` tables with name, source, replicas and per-model ``batching``.
The seed's ``MLX_*`` environment variables keep their meaning.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from actors.protocol import DEFAULT_CONNECT
from actors.shard_group import MAX_SHARDS, SHARD_MODES


POLICIES = ("immediate", "fixed", "adaptive")  # the batching-window policies (workers/policies.py)


class ConfigError(ValueError):
    """A setting with a bad value; the message names the setting and its source."""


# The precisions a model may be served at (workers/models/precision.py applies them).
DTYPES = ("auto", "quantized", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BatchingConfig:
    """How a worker admits waiting requests into its continuous batch."""

    policy: str = "fixed"  # immediate | fixed | adaptive
    window_ms: float = 1.0
    decode_window_ms: float = 0.0  # hold while a full batch decodes, scaled by fullness (fixed/adaptive); off
    fast_path: bool = True
    adaptive_low_ms: float = 0.75
    adaptive_medium_ms: float = 1.0
    adaptive_high_ms: float = 2.0
    adaptive_low_depth: int = 1
    adaptive_medium_depth: int = 5
    admission_batch: int = 8  # waiting requests prefilled together
    decode_capacity: int = 16  # sequences decoding at once; advertised to the broker
    # Prompt tokens per sequence per engine step: bounds how long decoding sequences stall
    # behind a long prompt, against the throughput of larger prefill chunks.
    prefill_step_size: int = 128
    auto_tune: bool = False
    auto_tune_min_batch: int = 2
    auto_tune_max_batch: int = 8
    auto_tune_ema_alpha: float = 0.3
    auto_tune_interval: int = 10
    p99_threshold_ms: float = 500.0  # auto-tune target for p99 time-to-first-token
    prompt_cache_entries: int = 64  # KV caches of finished sequences kept for prefix reuse; 0: off
    prompt_cache_bytes: int = 512 * 1024 * 1024  # most bytes those caches may hold; 0: off
    solo_fast_path: bool = True  # a lone request on an idle worker decodes via mlx-lm's generate_step


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its name, where its weights come from, how many replicas."""

    name: str
    source: str
    replicas: int = 1
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    on_demand: bool = False  # no worker until the first request; stopped after idle_unload_s
    idle_unload_s: float = 300.0
    dtype: str = "auto"  # one of DTYPES: auto = float32 on a CPU device, as stored (quantized) elsewhere
    shards: int = 1  # ranks per replica: >1 splits the weights over a group on MLX's ring (actors/shard_group.py)
    shard_mode: str = "auto"  # auto (tensor where the model supports it) | tensor | pipeline


@dataclass(frozen=True)
class FleetConfig:
    """Everything `mlx-fleet up` needs."""

    frontend: str = DEFAULT_CONNECT
    backend: str = "tcp://127.0.0.1:5556"
    metrics_export: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    # Where the collector PULLs metric events from the broker, workers and supervisor.
    # tcp on loopback next to the frontend/backend defaults: unique per port rather than
    # per /tmp path, and reachable by workers on other hosts once bound wider.
    metrics_events: str = "tcp://127.0.0.1:5557"
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 5  # 3 gave false deaths on a 2-core host at load average ~7
    ready_timeout_s: float = 180.0
    drain_timeout_s: float = 30.0
    queue_limit: int = 1024
    request_timeout_s: float = 600.0
    no_worker_timeout_s: float = 60.0  # a queued request fails `unavailable` after this long with no live worker
    http_host: str = "127.0.0.1"  # OpenAI-compatible gateway (mlx_fleet/gateway/server.py)
    http_port: int = 8000  # 0 turns the gateway off
    api_key: str = field(default="", repr=False)  # bearer token the gateway requires; empty: none
    blas: str = "auto"
    dtype: str = "auto"  # the models' default precision (one of DTYPES); [[models]] may set their own
    restart_max: int = 5  # restarts of one child allowed within restart_window_s
    restart_window_s: float = 60.0
    restart_backoff_s: float = 0.5  # first restart delay; doubles per restart
    restart_backoff_max_s: float = 30.0
    restart_stable_s: float = 10.0  # a child that ran this long before it exited restarts after restart_backoff_s again
    hung_grace_s: float = 30.0  # kill a worker the broker declared silent or hung after this long
    hung_step_s: float = 60.0  # a worker holding work whose engine loop made no progress this long is hung
    client_hwm: int = 1000  # messages queued per client before it counts as not reading
    # The kernel's send buffer per client connection (0: the OS default, which grows to megabytes
    # over tcp and would hide a client that stopped reading from client_hwm).
    client_sndbuf_bytes: int = 65_536
    # Broker recovery (docs/protocol.md, Broker recovery). Workers: how long they keep decoding
    # for a lost broker, and the bytes of output they keep to resend. Broker: how long after it
    # starts a resent request waits for a worker's table, and for a client to reconnect.
    recovery_grace_s: float = 10.0
    recovery_buffer_bytes: int = 64 * 1024 * 1024
    adoption_window_s: float = 3.0
    client_return_s: float = 10.0
    log_level: str = "INFO"
    # Cluster: CurveZMQ key files (certificates from `mlx-fleet keys`), bind policy, memory budget.
    curve_server_secret: str = ""  # the broker's secret cert; set, both endpoints require CurveZMQ
    curve_authorized_dir: str = ""  # public certs of the clients and workers allowed in
    curve_client_secret: str = ""  # clients and remote workers: their own secret cert
    curve_server_public: str = ""  # clients and remote workers: the broker's public cert
    insecure: bool = False  # allow binding a non-loopback address without CurveZMQ
    memory_budget_bytes: int = 0  # estimated weight bytes the supervisor may load; 0: no limit
    runtime_dir: str = ""  # set by the supervisor: its private folder (control socket, local keys)
    models: tuple[ModelSpec, ...] = ()
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    def model(self, name: str) -> ModelSpec:
        """The spec of model ``name``; KeyError if not configured."""
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)


_FLEET_KEYS = {f.name: f for f in dataclasses.fields(FleetConfig) if f.name not in ("models", "batching", "runtime_dir")}
_BATCH_KEYS = {f.name: f for f in dataclasses.fields(BatchingConfig)}

# Environment variables, the seed's first. A value may map through a function.
ENV_VARS: dict[str, str] = {
    "MLX_GPU_SCHEDULER_WINDOW_MS": "window_ms",
    "MLX_GPU_SCHEDULER_BATCH_SIZE": "admission_batch",
    "MLX_GPU_SCHEDULER_P99_THRESHOLD_MS": "p99_threshold_ms",
    "MLX_FAST_PATH": "fast_path",
    "MLX_ADAPTIVE_WINDOW_LOW_MS": "adaptive_low_ms",
    "MLX_ADAPTIVE_WINDOW_MEDIUM_MS": "adaptive_medium_ms",
    "MLX_ADAPTIVE_WINDOW_HIGH_MS": "adaptive_high_ms",
    "MLX_AUTO_TUNE": "auto_tune",
    "MLX_AUTO_TUNE_MIN_BATCH": "auto_tune_min_batch",
    "MLX_AUTO_TUNE_MAX_BATCH": "auto_tune_max_batch",
    "MLX_AUTO_TUNE_EMA_ALPHA": "auto_tune_ema_alpha",
    "MLX_AUTO_TUNE_INTERVAL": "auto_tune_interval",
    "MLX_METRICS_EXPORT": "metrics_export",
    "MLX_METRICS_PORT": "metrics_port",
    "MLX_FLEET_METRICS_EVENTS": "metrics_events",
    "MLX_FLEET_FRONTEND": "frontend",
    "MLX_FLEET_BACKEND": "backend",
    "MLX_FLEET_BLAS": "blas",
    "MLX_FLEET_DTYPE": "dtype",
    "MLX_FLEET_DECODE_CAPACITY": "decode_capacity",
    "MLX_FLEET_DECODE_WINDOW_MS": "decode_window_ms",
    "MLX_FLEET_PREFILL_STEP_SIZE": "prefill_step_size",
    "MLX_FLEET_QUEUE_LIMIT": "queue_limit",
    "MLX_FLEET_LOG_LEVEL": "log_level",
    "MLX_FLEET_PROMPT_CACHE_ENTRIES": "prompt_cache_entries",
    "MLX_FLEET_PROMPT_CACHE_BYTES": "prompt_cache_bytes",
    "MLX_FLEET_SOLO_FAST_PATH": "solo_fast_path",
    "MLX_FLEET_HTTP_PORT": "http_port",
    "MLX_FLEET_API_KEY": "api_key",
}
ENV_VARS.update({
    "MLX_FLEET_CURVE_SERVER_SECRET": "curve_server_secret",
    "MLX_FLEET_CURVE_AUTHORIZED_DIR": "curve_authorized_dir",
    "MLX_FLEET_CURVE_CLIENT_SECRET": "curve_client_secret",
    "MLX_FLEET_CURVE_SERVER_PUBLIC": "curve_server_public",
    "MLX_FLEET_MEMORY_BUDGET_BYTES": "memory_budget_bytes",
})


def parse_bool(text: str | bool, name: str = "value") -> bool:
    """'1/true/on/yes' or '0/false/off/no' (any case) to a bool."""
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "on", "yes"):
        return True
    if low in ("0", "false", "off", "no"):
        return False
    raise ConfigError(f"{name}: expected on/off, got {text!r}")


def _coerce(name: str, value: Any, typ: Any, source: str) -> Any:
    label = f"{name} (from {source})"
    try:
        if typ in (bool, "bool"):
            return parse_bool(value, label)
        if typ in (int, "int"):
            # int(2.5) would silently truncate a TOML float; only whole numbers are ints.
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ in (float, "float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label}: cannot use {value!r} as {getattr(typ, '__name__', typ)}") from None


def _scheduler_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The seed's on/off switches map onto the policy name."""
    out: dict[str, Any] = {}
    if "MLX_GPU_SCHEDULER" in env and not parse_bool(env["MLX_GPU_SCHEDULER"], "MLX_GPU_SCHEDULER"):
        out["policy"] = "immediate"
    elif "MLX_ADAPTIVE_WINDOW" in env:
        if parse_bool(env["MLX_ADAPTIVE_WINDOW"], "MLX_ADAPTIVE_WINDOW"):
            out["policy"] = "adaptive"
        elif parse_bool(env.get("MLX_GPU_SCHEDULER", "on"), "MLX_GPU_SCHEDULER"):
            out["policy"] = "fixed"
    elif "MLX_GPU_SCHEDULER" in env:
        out["policy"] = "fixed"
    return out


def env_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """Flat settings read from environment variables (raw strings, coerced later)."""
    out: dict[str, Any] = {key: env[var] for var, key in ENV_VARS.items() if var in env}
    out.update(_scheduler_env(env))
    return out


def _flatten_toml(data: Mapping[str, Any], path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    flat: dict[str, Any] = {}
    models: list[dict[str, Any]] = []
    for key, value in data.items():
        if key in ("fleet", "batching") and isinstance(value, dict):
            flat.update(value)
        elif key == "models":
            if not isinstance(value, list):
                raise ConfigError(f"{path}: 'models' must be an array of tables ([[models]])")
            models = value
        else:
            flat[key] = value
    return flat, models


def _apply(flat: Mapping[str, Any], source: str, into: dict[str, Any]) -> None:
    for key, value in flat.items():
        f = _FLEET_KEYS.get(key) or _BATCH_KEYS.get(key)
        if f is None:
            raise ConfigError(f"unknown setting {key!r} (from {source})")
        into[key] = _coerce(key, value, f.type, source)


def _build_batching(values: Mapping[str, Any], base: BatchingConfig) -> BatchingConfig:
    batching = dataclasses.replace(base, **{k: v for k, v in values.items() if k in _BATCH_KEYS})
    validate_batching(batching)
    return batching


def validate_batching(b: BatchingConfig) -> None:
    """Raise ConfigError for values no worker could run with."""
    if b.policy not in POLICIES:
        raise ConfigError(f"policy: expected {', '.join(POLICIES[:-1])} or {POLICIES[-1]}, got {b.policy!r}")
    for name in ("window_ms", "decode_window_ms", "adaptive_low_ms", "adaptive_medium_ms", "adaptive_high_ms"):
        if not 0.0 <= getattr(b, name) <= 10_000.0:
            raise ConfigError(f"{name}: must be in [0, 10000] ms")
    if b.admission_batch < 1 or b.decode_capacity < 1 or b.prefill_step_size < 1:
        raise ConfigError("admission_batch, decode_capacity and prefill_step_size must be >= 1")
    if not 1 <= b.auto_tune_min_batch <= b.auto_tune_max_batch:
        raise ConfigError("auto_tune_min_batch must be in 1..auto_tune_max_batch")
    if not 0.0 < b.auto_tune_ema_alpha <= 1.0 or b.auto_tune_interval < 1:
        raise ConfigError("auto_tune_ema_alpha must be in (0, 1] and auto_tune_interval >= 1")
    if b.prompt_cache_entries < 0 or b.prompt_cache_bytes < 0:
        raise ConfigError("prompt_cache_entries and prompt_cache_bytes must be >= 0 (0 turns the cache off)")


def parse_model_arg(text: str) -> tuple[str, str]:
    """'NAME=SOURCE' to (name, source); a bare SOURCE names itself."""
    name, sep, source = text.partition("=")
    if not sep:
        name, source = Path(text).name or text, text
    if not name or not source:
        raise ConfigError(f"--model: expected NAME=SOURCE, got {text!r}")
    return name, source


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    models: list[tuple[str, str]] | None = None,
    replicas: Mapping[str, int] | None = None,
    shards: Mapping[str, int] | None = None,
) -> FleetConfig:
    """Build the config from defaults, a TOML file, the environment and CLI overrides.

    ``models``, ``replicas`` and ``shards`` come from repeatable CLI flags and replace or
    extend the TOML's ``[[models]]``. With no model anywhere, the built-in demo
    model is served as ``demo``.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    toml_models: list[dict[str, Any]] = []
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        flat, toml_models = _flatten_toml(data, str(path))
        _apply(flat, str(path), values)
    _apply(env_settings(env), "environment", values)
    _apply({k: v for k, v in (overrides or {}).items() if v is not None}, "command line", values)

    batching = _build_batching(values, BatchingConfig())
    fleet_dtype = check_dtype(values.get("dtype", FleetConfig.dtype), "dtype")
    specs: dict[str, ModelSpec] = {}
    for entry in toml_models:
        spec = _model_from_toml(entry, batching, str(path), fleet_dtype)
        specs[spec.name] = spec
    for name, source in models or []:
        old = specs.get(name)
        specs[name] = dataclasses.replace(old, source=source) if old else ModelSpec(name, source, 1, batching,
                                                                                    dtype=fleet_dtype)
    if not specs:
        specs["demo"] = ModelSpec("demo", "demo", 1, batching, dtype=fleet_dtype)
    for flag, field_name, counts in (("--replicas", "replicas", replicas), ("--shards", "shards", shards)):
        for name, count in (counts or {}).items():
            if name not in specs:
                raise ConfigError(f"{flag} {name}={count}: no model named {name!r}")
            specs[name] = dataclasses.replace(specs[name], **{field_name: count})
    for spec in specs.values():
        if not 0 <= spec.replicas <= 64:
            raise ConfigError(f"model {spec.name}: replicas must be in 0..64")
        check_shards(spec.shards, spec.shard_mode, f"model {spec.name}")
        if spec.idle_unload_s <= 0:
            raise ConfigError(f"model {spec.name}: idle_unload_s must be > 0")
    fleet = {k: v for k, v in values.items() if k in _FLEET_KEYS}
    cfg = FleetConfig(**fleet, models=tuple(specs.values()), batching=batching)
    if cfg.heartbeat_interval_s <= 0 or cfg.heartbeat_liveness < 1:
        raise ConfigError("heartbeat_interval_s must be > 0 and heartbeat_liveness >= 1")
    if not 0 <= cfg.metrics_port <= 65535:
        raise ConfigError("metrics_port must be in 0..65535")
    if not 0 <= cfg.http_port <= 65535:
        raise ConfigError("http_port must be in 0..65535 (0 turns the HTTP gateway off)")
    if cfg.no_worker_timeout_s <= 0:
        raise ConfigError("no_worker_timeout_s must be > 0")
    if cfg.hung_step_s <= 0:
        raise ConfigError("hung_step_s must be > 0")
    if cfg.client_hwm < 1 or cfg.client_sndbuf_bytes < 0:
        raise ConfigError("client_hwm must be >= 1 and client_sndbuf_bytes >= 0 (0: the OS default)")
    validate_recovery(cfg)
    validate_cluster(cfg)
    return cfg


def validate_recovery(cfg: FleetConfig) -> None:
    """Raise ConfigError for recovery and restart settings no process could run with."""
    for name in ("recovery_grace_s", "adoption_window_s", "client_return_s", "restart_stable_s"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0")
    if cfg.recovery_buffer_bytes < 0:
        raise ConfigError("recovery_buffer_bytes must be >= 0 (0: a worker keeps nothing for a lost broker)")


def validate_cluster(cfg: FleetConfig) -> None:
    """Raise ConfigError for curve and budget settings that cannot work together."""
    if cfg.curve_server_secret and not cfg.curve_authorized_dir:
        raise ConfigError("curve_server_secret needs curve_authorized_dir: the folder of the public certs "
                          "of clients and workers allowed in (see `mlx-fleet keys`)")
    if cfg.curve_authorized_dir and not cfg.curve_server_secret:
        raise ConfigError("curve_authorized_dir is set but curve_server_secret is not; set both to turn CurveZMQ on")
    if bool(cfg.curve_client_secret) != bool(cfg.curve_server_public):
        raise ConfigError("curve_client_secret and curve_server_public go together (a client needs both)")
    if cfg.memory_budget_bytes < 0:
        raise ConfigError("memory_budget_bytes must be >= 0 (0: no limit)")


def check_shards(shards: int, mode: str, what: str) -> None:
    """ConfigError naming ``what`` unless ``shards`` is 1..64 and ``mode`` one of SHARD_MODES."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ConfigError(f"{what}: shards must be in 1..{MAX_SHARDS} (1: not sharded)")
    if mode not in SHARD_MODES:
        raise ConfigError(f"{what}: shard_mode must be one of {', '.join(SHARD_MODES)}, got {mode!r}")


def shard_bounds(cfg: FleetConfig, mode: str) -> dict[str, Any]:
    """A sharded group's mode and bounds from the fleet's settings (``ShardRank``'s keywords, actors/shard_group.py):
    an engine operation past ``hung_step_s`` is a hung rank, forming the group has ``ready_timeout_s``, and rank 0
    waits twice the heartbeat liveness for a follower's beat."""
    return {"mode": mode, "op_timeout_s": cfg.hung_step_s, "start_timeout_s": cfg.ready_timeout_s,
            "beat_timeout_s": 2 * cfg.heartbeat_interval_s * cfg.heartbeat_liveness}


def check_dtype(value: Any, what: str) -> str:
    """``value`` if it is one of DTYPES; ConfigError naming ``what`` otherwise."""
    if value not in DTYPES:
        raise ConfigError(f"{what}: expected one of {', '.join(DTYPES)}, got {value!r}")
    return str(value)


def _model_from_toml(entry: Mapping[str, Any], batching: BatchingConfig, path: str, dtype: str) -> ModelSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("source"), str):
        raise ConfigError(f"{path}: each [[models]] needs string 'name' and 'source'")
    unknown = set(entry) - {"name", "source", "replicas", "batching", "on_demand", "idle_unload_s", "dtype", "shards",
                            "shard_mode"}
    if unknown:
        raise ConfigError(f"{path}: model {entry['name']}: unknown keys {sorted(unknown)}")
    own_batching = entry.get("batching", {})
    source = f"{path} [models.{entry['name']}]"
    # Only batching settings belong here; fleet-wide ones would be silently dropped.
    if not isinstance(own_batching, dict):
        raise ConfigError(f"{source}: 'batching' must be a table")
    for key in own_batching:
        if key not in _BATCH_KEYS:
            raise ConfigError(f"unknown batching setting {key!r} (from {source})")
    own: dict[str, Any] = {}
    _apply(own_batching, source, own)
    replicas = _coerce("replicas", entry.get("replicas", 1), int, path)
    on_demand = _coerce("on_demand", entry.get("on_demand", False), bool, source)
    idle_unload_s = _coerce("idle_unload_s", entry.get("idle_unload_s", ModelSpec.idle_unload_s), float, source)
    own_dtype = check_dtype(entry.get("dtype", dtype), f"{source} dtype")
    shards = _coerce("shards", entry.get("shards", 1), int, source)
    shard_mode = _coerce("shard_mode", entry.get("shard_mode", ModelSpec.shard_mode), str, source)
    return ModelSpec(entry["name"], entry["source"], replicas, _build_batching(own, batching), on_demand, idle_unload_s,
                     own_dtype, shards, shard_mode)
