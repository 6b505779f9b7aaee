"""What sizing the decode capacity reads from MLX: a loaded model's KV shape, and the free memory.

The arithmetic is pure and lives in :mod:`workers.capacity`; this module only reads:

- the KV shape from the model's config (``model.args``: layers, KV heads, head dim, context
  length) and the dtype its activations run at (the most common floating dtype among its
  parameters: a quantized model's scales, a float model's weights);
- the free memory, after the weights are loaded: on a CUDA device ``mx.device_info()``'s
  ``free_memory`` (NVML's device-wide figure where MLX finds NVML); on a Metal device its
  ``max_recommended_working_set_size`` less ``mx.get_active_memory()`` (unified memory, so
  what MLX may use, less what it holds); on a CPU the machine's available RAM
  (``MemAvailable`` of /proc/meminfo on Linux, ``hw.memsize`` on macOS, where a CPU device
  is the exception).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten

from workers.capacity import FreeMemory, KvShape, mem_available_bytes


def kv_shape(model: Any) -> KvShape | None:
    """The KV shape of one token of ``model`` (its whole config, before any sharding); None when unknown."""
    args = getattr(model, "args", None)
    args = getattr(args, "text_config", None) or args  # multimodal configs nest the language model's
    if args is None:
        return None
    read = args.get if isinstance(args, dict) else lambda name, default=None: getattr(args, name, default)
    layers = read("num_hidden_layers") or len(getattr(model, "layers", []) or [])
    heads = read("num_attention_heads") or 0
    kv_heads = read("num_key_value_heads") or heads
    head_dim = read("head_dim") or (read("hidden_size", 0) // heads if heads else 0)
    if not (layers and kv_heads and head_dim):
        return None
    context = read("max_position_embeddings") or 0
    return KvShape(int(layers), int(kv_heads), int(head_dim), activation_bytes(model), int(context))


def activation_bytes(model: Any) -> int:
    """Bytes of one value of the dtype ``model`` computes in (4 when it holds no floating parameter)."""
    kinds: Counter[Any] = Counter()
    for _, value in cast(list[tuple[str, Any]], tree_flatten(model.parameters())):
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            kinds[value.dtype] += 1
    if not kinds:
        return 4
    dtype = max(kinds, key=lambda d: kinds[d])
    return int(dtype.size)


def free_memory() -> FreeMemory | None:
    """What the default device has free for this worker now; None when it cannot be read."""
    if mx.default_device().type == mx.gpu:
        info = mx.device_info()
        if "free_memory" in info:  # CUDA
            return FreeMemory(int(info["free_memory"]), "cuda free_memory")
        limit = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if limit:  # Metal: unified memory, of which MLX already holds the weights
            return FreeMemory(max(0, int(limit) - mx.get_active_memory()), "metal working set")
        return None
    return cpu_free_memory()


def cpu_free_memory() -> FreeMemory | None:
    """The machine's available RAM (a CPU device keeps the KV caches there)."""
    if sys.platform.startswith("linux"):
        try:
            found = mem_available_bytes(Path("/proc/meminfo").read_text())
        except OSError:
            return None
        return None if found is None else FreeMemory(found, "MemAvailable")
    if sys.platform == "darwin":
        try:
            text = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return FreeMemory(int(text), "hw.memsize") if text.isdigit() else None
    return None
