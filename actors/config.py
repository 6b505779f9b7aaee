"""Configuration: the settings of a fleet, their defaults, and the checks on their values.

Every setting has one flat name (``window_ms``, ``frontend``...). :mod:`actors.config_load`
builds a :class:`FleetConfig` from defaults < TOML file < environment variables < CLI flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from actors.protocol import DEFAULT_CONNECT
from actors.shard_group import MAX_SHARDS, SHARD_MODES


POLICIES = ("immediate", "fixed", "adaptive")  # the batching-window policies (workers/policies.py)
ROUTINGS = ("cache_aware", "least_loaded")  # how the broker picks a replica (broker/routing.py)
AUTO: Literal["auto"] = "auto"


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
    # Sequences decoding at once, advertised to the broker: "auto" sizes it from the memory left after the
    # weights (workers/capacity.py); a number is used as given.
    decode_capacity: int | Literal["auto"] = AUTO
    decode_capacity_max: int = 64  # the most "auto" gives: past it a step's cost grows with no gain per sequence
    kv_memory_fraction: float = 0.5  # share of the free memory "auto" may fill with KV caches
    kv_tokens_per_sequence: int = 1280  # KV tokens "auto" budgets per sequence: a typical prompt plus max_tokens
    # Prompt tokens per sequence per engine step: bounds how long decoding sequences stall
    # behind a long prompt, against the throughput of larger prefill chunks.
    prefill_step_size: int = 128
    # While prompts wait, decoding sequences pause for their prefill, for at most this many prompt
    # tokens at a time (workers/engine/batch.py); 0: each step decodes and prefills, as mlx-lm's does.
    prefill_first_tokens: int = 2048
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
    chat_template: str = ""  # a Jinja file (or a shipped template's name) replacing the tokenizer's; "": its own
    tool_format: str = ""  # how the model writes tool calls: an mlx-lm tool parser name, or none; "": the tokenizer's


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
    # Routing (broker/routing.py): to the replica holding the longest cached prefix of a request, when it holds
    # at least routing_min_match of the request's prefix blocks, unless the replicas' loads (requests running)
    # differ by more than routing_balance_abs and by more than routing_balance_rel times; else to the least loaded.
    routing: str = "cache_aware"  # cache_aware | least_loaded
    routing_min_match: float = 0.5
    routing_balance_abs: int = 8
    routing_balance_rel: float = 1.5
    runtime_dir: str = ""  # set by the supervisor: its private folder (control socket, local keys)
    models: tuple[ModelSpec, ...] = ()
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    def model(self, name: str) -> ModelSpec:
        """The spec of model ``name``; KeyError if not configured."""
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)


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


def validate_batching(b: BatchingConfig) -> None:
    """Raise ConfigError for values no worker could run with."""
    if b.policy not in POLICIES:
        raise ConfigError(f"policy: expected {', '.join(POLICIES[:-1])} or {POLICIES[-1]}, got {b.policy!r}")
    for name in ("window_ms", "decode_window_ms", "adaptive_low_ms", "adaptive_medium_ms", "adaptive_high_ms"):
        if not 0.0 <= getattr(b, name) <= 10_000.0:
            raise ConfigError(f"{name}: must be in [0, 10000] ms")
    if b.decode_capacity != AUTO and (not isinstance(b.decode_capacity, int) or b.decode_capacity < 1):
        raise ConfigError(f"decode_capacity: expected \"auto\" or a number >= 1, got {b.decode_capacity!r}")
    if min(b.admission_batch, b.decode_capacity_max, b.prefill_step_size, b.kv_tokens_per_sequence) < 1:
        raise ConfigError("admission_batch, decode_capacity_max, prefill_step_size and kv_tokens_per_sequence "
                          "must be >= 1")
    if b.prefill_first_tokens < 0:
        raise ConfigError("prefill_first_tokens must be >= 0 (0: decoding never pauses for prompts)")
    if not 0.0 < b.kv_memory_fraction <= 1.0:
        raise ConfigError("kv_memory_fraction must be in (0, 1]")
    if not 1 <= b.auto_tune_min_batch <= b.auto_tune_max_batch:
        raise ConfigError("auto_tune_min_batch must be in 1..auto_tune_max_batch")
    if not 0.0 < b.auto_tune_ema_alpha <= 1.0 or b.auto_tune_interval < 1:
        raise ConfigError("auto_tune_ema_alpha must be in (0, 1] and auto_tune_interval >= 1")
    if b.prompt_cache_entries < 0 or b.prompt_cache_bytes < 0:
        raise ConfigError("prompt_cache_entries and prompt_cache_bytes must be >= 0 (0 turns the cache off)")


def fixed_capacity(b: BatchingConfig) -> int | None:
    """The decode capacity set as a number, or None when it is "auto" (sized by the worker)."""
    return None if b.decode_capacity == AUTO else int(b.decode_capacity)


def parse_capacity(value: Any, label: str = "decode_capacity") -> int | Literal["auto"]:
    """"auto" (any case) or a whole number >= 1; ConfigError naming ``label`` otherwise."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label}: expected \"auto\" or a number >= 1, got {value!r}") from None
    if number < 1:
        raise ConfigError(f"{label}: expected \"auto\" or a number >= 1, got {value!r}")
    return number


def validate_routing(cfg: FleetConfig) -> None:
    """Raise ConfigError for routing settings the broker cannot use."""
    if cfg.routing not in ROUTINGS:
        raise ConfigError(f"routing: expected one of {', '.join(ROUTINGS)}, got {cfg.routing!r}")
    if cfg.routing_balance_abs < 0 or cfg.routing_balance_rel < 1.0:
        raise ConfigError("routing_balance_abs must be >= 0 and routing_balance_rel >= 1")
    if not 0.0 <= cfg.routing_min_match <= 1.0:
        raise ConfigError("routing_min_match must be in [0, 1] (a share of the request's prefix blocks)")


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
