"""The decode capacity sized from memory: pure arithmetic, table-driven (workers/capacity.py)."""

from __future__ import annotations

import dataclasses

import pytest

from actors.config import BatchingConfig
from workers.capacity import (
    FALLBACK_CAPACITY, GIB, MIB, CapacityPlan, FreeMemory, KvShape, agree, mem_available_bytes, plan_capacity,
)

pytestmark = pytest.mark.timeout(30)

# SmolLM2-135M in float32: 30 layers x 3 KV heads x 64 x 2 x 4 bytes = 45 KiB a token.
SMOLLM2 = KvShape(layers=30, kv_heads=3, head_dim=64, dtype_bytes=4, context_tokens=8192)
NO_CACHE = BatchingConfig(prompt_cache_entries=0)


def plan(free_gib: float, *, b: BatchingConfig = NO_CACHE, kv: KvShape | None = SMOLLM2, **kwargs: int) -> CapacityPlan:
    return plan_capacity(b, kv=kv, free=FreeMemory(int(free_gib * GIB), "MemAvailable"), **kwargs)


def test_kv_bytes_per_token_come_from_the_config() -> None:
    assert SMOLLM2.bytes_per_token == 30 * 3 * 64 * 2 * 4 == 46_080
    assert dataclasses.replace(SMOLLM2, dtype_bytes=2).bytes_per_token == 23_040


def test_a_memory_budget_shrinks_the_capacity() -> None:
    # 1280 tokens x 45 KiB = 56.25 MiB a sequence; half the free memory is for KV.
    per_sequence = 1280 * 46_080
    assert plan(64).capacity == 64  # room for ~580: the cap decides
    assert plan(4).capacity == int(2 * GIB // per_sequence) == 36
    assert plan(1).capacity == int(0.5 * GIB // per_sequence) == 9
    assert plan(0.01).capacity == 1  # never below one: requests wait in the broker rather than fail
    sizes = [plan(g).capacity for g in (0.01, 0.5, 1, 2, 4, 8, 64)]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize(("kwargs", "want"), [
    ({}, 36),
    ({"share": 2}, 18),  # two replicas on the machine split its memory
    ({"share": 4}, 9),
    ({"shards": 2}, 64),  # each rank holds half of a token's KV: room for 72, capped at 64
])
def test_the_share_and_the_shards_divide_the_memory(kwargs: dict[str, int], want: int) -> None:
    assert plan(4, **kwargs).capacity == want


def test_the_prompt_cache_comes_off_the_budget_and_the_fraction_scales_it() -> None:
    with_cache = BatchingConfig(prompt_cache_entries=64, prompt_cache_bytes=512 * MIB)
    assert plan(4, b=with_cache).capacity == int((2 * GIB - 512 * MIB) // (1280 * 46_080)) == 27
    assert plan(4, b=dataclasses.replace(NO_CACHE, kv_memory_fraction=0.25)).capacity == 18
    assert plan(0.5, b=with_cache).capacity == 1  # the cache alone takes the whole budget


def test_the_context_is_bounded_by_the_models_and_the_setting() -> None:
    short = dataclasses.replace(SMOLLM2, context_tokens=640)
    assert plan(1, kv=short).capacity == 18  # 640 tokens a sequence, not 1280
    longer = dataclasses.replace(NO_CACHE, kv_tokens_per_sequence=2560)
    assert plan(4, b=longer).capacity == 18


def test_a_number_wins_and_the_cap_bounds_auto() -> None:
    fixed = plan(0.01, b=BatchingConfig(decode_capacity=48))
    assert (fixed.capacity, fixed.setting, fixed.reason) == (48, "48", "set: decode_capacity=48")
    assert plan(64, b=dataclasses.replace(NO_CACHE, decode_capacity_max=200)).capacity == 200
    assert "capped at decode_capacity_max=64" in plan(64).reason


def test_unknown_memory_or_shape_falls_back() -> None:
    no_memory = plan_capacity(NO_CACHE, kv=SMOLLM2, free=None)
    assert no_memory.capacity == FALLBACK_CAPACITY and "free memory unknown" in no_memory.reason
    no_shape = plan(4, kv=None)
    assert no_shape.capacity == FALLBACK_CAPACITY and "KV shape unknown" in no_shape.reason
    assert plan(4, kv=None, b=dataclasses.replace(NO_CACHE, decode_capacity_max=4)).capacity == 4


def test_the_plan_says_its_inputs_and_why() -> None:
    p = plan(4, share=2)
    info = p.info()
    assert info["capacity"] == 18 and info["setting"] == "auto"
    assert (info["free_bytes"], info["memory_source"], info["share"]) == (4 * GIB, "MemAvailable", 2)
    assert (info["kv_bytes_per_token"], info["context_tokens"], info["kv_memory_fraction"]) == (46_080, 1280, 0.5)
    assert p.reason.startswith("auto: 4.0 GiB free (MemAvailable) x 0.5 / 2 workers")
    assert "fits 18" in p.reason


@pytest.mark.parametrize(("text", "want"), [
    ("MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   20000000 kB\n", 20_000_000 * 1024),
    ("MemTotal: 1 kB\n", None),
    ("MemAvailable: lots kB\n", None),
    ("", None),
])
def test_mem_available_from_proc_meminfo(text: str, want: int | None) -> None:
    assert mem_available_bytes(text) == want


def test_a_group_agrees_on_its_smallest_rank() -> None:
    assert agree([40, 12, 64]) == 12
    assert agree([]) == 1
