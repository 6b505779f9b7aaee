"""How many sequences a worker decodes at once: sized from the memory left after the weights.

Pure: no MLX, no I/O. :mod:`workers.engine.memory` reads the two inputs from the loaded model
and the device (the KV shape of a token, the free memory) and this module turns them into a
capacity, with the reason in words, for ``ready`` and `status`.

With ``decode_capacity = "auto"`` (the default)::

    budget      = free memory x kv_memory_fraction / share - prompt_cache_bytes
    per seq     = KV bytes per token x context tokens / shards
    capacity    = budget // per seq, within 1..decode_capacity_max

- *KV bytes per token* come from the model's config: layers x KV heads x head dim x 2 (keys
  and values) x the bytes of its activation dtype.
- *Context tokens* is ``kv_tokens_per_sequence`` (a typical prompt plus the default
  ``max_tokens``), bounded by the model's context length.
- *Free memory* is what the device has once the weights are loaded: on a GPU MLX's device
  info, on a CPU the machine's available RAM. *Share* is how many worker processes of this
  fleet share that memory on this machine (the supervisor knows; a remote worker counts 1).
- ``prompt_cache_bytes`` is KV memory too (the finished sequences kept for prefix reuse),
  so it comes off the budget first.
- A sharded replica holds 1/``shards`` of each token's KV on each rank; its ranks agree on
  the smallest capacity any of them can hold.

A number for ``decode_capacity`` wins, as given. When the memory cannot be read, "auto"
falls back to ``FALLBACK_CAPACITY`` (the fixed default this replaced), capped as usual.
Requests beyond a worker's capacity wait in the broker's queue; they never fail for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.config import BatchingConfig, fixed_capacity

FALLBACK_CAPACITY = 16
GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class KvShape:
    """What one token of one sequence holds in the KV cache, from the model's config."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    context_tokens: int = 0  # the model's context length; 0 when its config does not say

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of every layer for one token."""
        return self.layers * self.kv_heads * self.head_dim * 2 * self.dtype_bytes


@dataclass(frozen=True)
class FreeMemory:
    """Memory this worker may find free now, and where the figure comes from."""

    bytes: int
    source: str  # e.g. "MemAvailable", "cuda free_memory", "metal working set"


@dataclass(frozen=True)
class CapacityPlan:
    """The capacity a worker advertises, what it was sized from, and why, in one line."""

    capacity: int
    setting: str  # "auto", or the number set
    reason: str
    inputs: dict[str, Any]

    def info(self) -> dict[str, Any]:
        """The plan as ``ready.info["capacity"]`` carries it (and `status` shows it)."""
        return {"capacity": self.capacity, "setting": self.setting, "reason": self.reason, **self.inputs}


def plan_capacity(batching: BatchingConfig, *, kv: KvShape | None, free: FreeMemory | None, share: int = 1,
                  shards: int = 1) -> CapacityPlan:
    """The decode capacity of one worker (one rank's share of a sharded replica) under ``batching``."""
    fixed = fixed_capacity(batching)
    if fixed is not None:
        return CapacityPlan(fixed, str(fixed), f"set: decode_capacity={fixed}", {})
    cap = batching.decode_capacity_max
    if kv is None or free is None or kv.bytes_per_token <= 0:
        missing = "the model's KV shape" if kv is None or kv.bytes_per_token <= 0 else "the free memory"
        n = min(FALLBACK_CAPACITY, cap)
        return CapacityPlan(n, "auto", f"auto: {missing} unknown, so {n} (the fallback, within decode_capacity_max)",
                            {"decode_capacity_max": cap})
    context = batching.kv_tokens_per_sequence
    if kv.context_tokens > 0:
        context = min(context, kv.context_tokens)
    share, shards = max(1, share), max(1, shards)
    reserved = batching.prompt_cache_bytes if batching.prompt_cache_entries > 0 else 0
    budget = int(free.bytes * batching.kv_memory_fraction / share) - reserved
    per_sequence = -(-kv.bytes_per_token * context // shards)
    fits = max(0, budget) // per_sequence
    capacity = max(1, min(cap, fits))
    inputs = {"free_bytes": free.bytes, "memory_source": free.source, "kv_memory_fraction": batching.kv_memory_fraction,
              "share": share, "reserved_bytes": reserved, "budget_bytes": budget, "kv_bytes_per_token": kv.bytes_per_token,
              "context_tokens": context, "shards": shards, "sequence_bytes": per_sequence, "fits": fits,
              "decode_capacity_max": cap}
    return CapacityPlan(capacity, "auto", _reason(inputs, capacity), inputs)


def _reason(i: dict[str, Any], capacity: int) -> str:
    """One line: the arithmetic of an "auto" plan, and which bound decided it."""
    share = f" / {i['share']} workers" if i["share"] > 1 else ""
    reserved = f" - {i['reserved_bytes'] / MIB:.0f} MiB prompt cache" if i["reserved_bytes"] else ""
    shards = f" / {i['shards']} ranks" if i["shards"] > 1 else ""
    text = (f"auto: {i['free_bytes'] / GIB:.1f} GiB free ({i['memory_source']}) x {i['kv_memory_fraction']:g}{share}"
            f"{reserved} = {max(0, i['budget_bytes']) / GIB:.2f} GiB for KV; {i['context_tokens']} tokens x "
            f"{i['kv_bytes_per_token'] / 1024:.1f} KiB{shards} = {i['sequence_bytes'] / MIB:.1f} MiB a sequence; "
            f"fits {i['fits']}")
    if i["fits"] > i["decode_capacity_max"]:
        return f"{text}, capped at decode_capacity_max={i['decode_capacity_max']}"
    if i["fits"] < 1:
        return f"{text}, so {capacity} (at least one)"
    return text


def mem_available_bytes(meminfo: str) -> int | None:
    """``MemAvailable`` from the text of Linux's /proc/meminfo, in bytes; None when absent."""
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "MemAvailable":
            parts = rest.split()
            if parts and parts[0].isdigit():
                scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
                return int(parts[0]) * scale
    return None


def agree(capacities: list[int]) -> int:
    """The capacity of a sharded group: the smallest any rank can hold (each rank runs the same batch)."""
    return max(1, min(capacities)) if capacities else 1
