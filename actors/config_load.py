"""Loading the configuration: defaults < TOML file < environment variables < CLI flags.

A TOML file may hold the flat settings of :mod:`actors.config` at the top level or in
``[fleet]`` / ``[batching]`` tables, plus ``[[models]]`` tables with name, source, replicas
and per-model ``batching``. The seed's ``MLX_*`` environment variables keep their meaning.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from actors.config import (
    BatchingConfig, ConfigError, FleetConfig, ModelSpec, check_dtype, check_shards, parse_bool, parse_capacity,
    validate_batching, validate_cluster, validate_recovery, validate_routing,
)

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
    "MLX_FLEET_DECODE_CAPACITY_MAX": "decode_capacity_max",
    "MLX_FLEET_KV_MEMORY_FRACTION": "kv_memory_fraction",
    "MLX_FLEET_ROUTING": "routing",
    "MLX_FLEET_DECODE_WINDOW_MS": "decode_window_ms",
    "MLX_FLEET_PREFILL_STEP_SIZE": "prefill_step_size",
    "MLX_FLEET_PREFILL_FIRST_TOKENS": "prefill_first_tokens",
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


def _coerce(name: str, value: Any, typ: Any, source: str) -> Any:
    label = f"{name} (from {source})"
    if name == "decode_capacity":
        return parse_capacity(value, label)
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
    chat_templates: Mapping[str, str] | None = None,
    tool_formats: Mapping[str, str] | None = None,
) -> FleetConfig:
    """Build the config from defaults, a TOML file, the environment and CLI overrides.

    ``models``, ``replicas``, ``shards``, ``chat_templates`` and ``tool_formats`` come from
    repeatable CLI flags and replace or extend the TOML's ``[[models]]``. With no model anywhere, the built-in demo
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
    per_model: tuple[tuple[str, str, Mapping[str, Any] | None], ...] = (
        ("--replicas", "replicas", replicas), ("--shards", "shards", shards),
        ("--chat-template", "chat_template", chat_templates), ("--tool-format", "tool_format", tool_formats))
    for flag, spec_field, by_name in per_model:
        for name, value in (by_name or {}).items():
            if name not in specs:
                raise ConfigError(f"{flag} {name}={value}: no model named {name!r}")
            specs[name] = dataclasses.replace(specs[name], **{spec_field: value})
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
    validate_routing(cfg)
    return cfg


def _model_from_toml(entry: Mapping[str, Any], batching: BatchingConfig, path: str, dtype: str) -> ModelSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("source"), str):
        raise ConfigError(f"{path}: each [[models]] needs string 'name' and 'source'")
    unknown = set(entry) - {"name", "source", "replicas", "batching", "on_demand", "idle_unload_s", "dtype", "shards",
                            "shard_mode", "chat_template", "tool_format"}
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
    chat_template = _coerce("chat_template", entry.get("chat_template", ""), str, source)
    tool_format = _coerce("tool_format", entry.get("tool_format", ""), str, source)
    return ModelSpec(entry["name"], entry["source"], replicas, _build_batching(own, batching), on_demand, idle_unload_s,
                     own_dtype, shards, shard_mode, chat_template, tool_format)
