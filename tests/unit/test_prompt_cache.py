"""The prompt cache's pure LRU logic, over fake KV caches (no MLX)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.prompt_cache import PromptCache, PromptCacheStats, common_prefix_len

BYTES_PER_TOKEN = 10


@dataclass
class FakeKV:
    """Stands in for a list of mlx-lm layer caches: the tokens it holds, and whether it trims."""

    tokens: list[int]
    trimmable: bool = True


def copy_prefix(kv: FakeKV, held: int, keep: int) -> FakeKV:
    assert held == len(kv.tokens) and 0 < keep <= held
    return FakeKV(list(kv.tokens[:keep]), kv.trimmable)


def make_cache(max_entries: int = 8, max_bytes: int = 10_000, min_hit_tokens: int = 1) -> PromptCache[FakeKV]:
    return PromptCache(max_entries=max_entries, max_bytes=max_bytes, size_of=lambda kv: BYTES_PER_TOKEN * len(kv.tokens),
                       copy_prefix=copy_prefix, can_trim=lambda kv: kv.trimmable, min_hit_tokens=min_hit_tokens)


def put(cache: PromptCache[FakeKV], tokens: list[int], trimmable: bool = True) -> bool:
    return cache.store(tokens, FakeKV(list(tokens), trimmable))


@pytest.mark.parametrize("a, b, want", [
    ([], [], 0), ([1], [], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2, 3], [1, 9, 3], 1),
    ([5], [6], 0), (list(range(1000)), list(range(999)) + [7], 999), ((1, 2, 3), [1, 2, 4], 2),
])
def test_common_prefix_len(a, b, want):
    assert common_prefix_len(a, b) == want
    assert common_prefix_len(b, a) == want


@pytest.mark.parametrize("stored, prompt, want_tokens", [
    # (entries stored, oldest first), prompt, tokens a hit reuses (0: miss)
    ([], [1, 2, 3], 0),
    ([[1, 2, 3]], [1, 2, 3, 4, 5], 3),  # a stored prefix: reused whole
    ([[1, 2, 3, 4, 5, 6]], [1, 2, 3, 9], 3),  # a longer entry: cut where they differ
    ([[1, 2, 3, 4]], [1, 2, 3, 4], 3),  # the same prompt: the last token is still prefilled
    ([[1, 2, 3, 4, 5]], [1, 2, 3], 2),  # the prompt is a prefix of an entry
    ([[7, 8, 9]], [1, 2, 3], 0),
    ([[1, 2, 9], [1, 2, 3, 4, 8]], [1, 2, 3, 4, 5], 4),  # the longest shared prefix wins
    ([[1]], [1], 0),  # a one-token prompt has nothing to reuse
])
def test_lookup_reuses_the_longest_shared_prefix(stored, prompt, want_tokens):
    cache = make_cache()
    for tokens in stored:
        put(cache, tokens)
    kv, n = cache.lookup(prompt)
    assert n == want_tokens
    if want_tokens:
        assert kv is not None and kv.tokens == prompt[:n]
        assert cache.stats.hits == 1 and cache.stats.hit_tokens == n
    else:
        assert kv is None and cache.stats.misses == 1


def test_lookup_hands_out_a_copy_so_the_entry_never_changes():
    cache = make_cache()
    put(cache, [1, 2, 3, 4])
    kv, _ = cache.lookup([1, 2, 3, 4, 5])
    kv.tokens.extend([5, 6, 7])  # the running sequence grows its cache
    again, n = cache.lookup([1, 2, 3, 4, 5])
    assert n == 4 and again.tokens == [1, 2, 3, 4] and again is not kv


def test_entries_that_cannot_be_trimmed_serve_only_whole_prefixes():
    cache = make_cache()
    put(cache, [1, 2, 3, 4, 5], trimmable=False)
    assert cache.lookup([1, 2, 3, 9]) == (None, 0)
    kv, n = cache.lookup([1, 2, 3, 4, 5, 6])
    assert n == 5 and kv.tokens == [1, 2, 3, 4, 5]
    put(cache, [1, 2, 3, 4, 5, 6, 7], trimmable=False)
    assert len(cache) == 2  # an untrimmable entry does not replace its prefixes


def test_min_hit_tokens_turns_short_matches_into_misses():
    cache = make_cache(min_hit_tokens=4)
    put(cache, [1, 2, 3, 4, 5, 6])
    assert cache.lookup([1, 2, 3, 9, 9]) == (None, 0)
    assert cache.lookup([1, 2, 3, 4, 9])[1] == 4


def test_store_replaces_the_same_key_and_drops_entries_it_extends():
    cache = make_cache()
    put(cache, [1, 2])
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 3])
    put(cache, [1, 9])
    assert cache.keys() == [(1, 2, 3), (1, 9)]
    assert cache.stats.bytes_held == 5 * BYTES_PER_TOKEN and cache.stats.entries == 2
    assert put(cache, [1, 2]) is True  # covered by (1, 2, 3): that one is used instead
    assert cache.keys() == [(1, 9), (1, 2, 3)] and cache.stats.stored == 4


@pytest.mark.parametrize("max_entries, max_bytes, sizes, kept", [
    # Entries are sequences [i]*size; ``kept`` lists the i that remain, LRU first.
    (2, 10_000, [1, 1, 1], [1, 2]),  # entry bound: the oldest goes
    (8, 50, [2, 2, 2], [1, 2]),  # byte bound: 60 > 50, the oldest goes
    (8, 50, [2, 3], [0, 1]),  # exactly at the bound stays
    (8, 50, [2, 6, 1], [0, 2]),  # over max_bytes alone: rejected, nothing evicted for it
    (8, 50, [4, 3], [1]),  # room for the new one is made first
    (1, 10_000, [1, 1], [1]),
])
def test_eviction_respects_both_bounds(max_entries, max_bytes, sizes, kept):
    cache = make_cache(max_entries=max_entries, max_bytes=max_bytes)
    for i, size in enumerate(sizes):
        put(cache, [i + 100] * size)
    assert [k[0] - 100 for k in cache.keys()] == kept
    assert cache.stats.bytes_held <= max_bytes and len(cache) <= max_entries
    assert cache.stats.rejected == sum(1 for s in sizes if s * BYTES_PER_TOKEN > max_bytes)


def test_a_hit_makes_an_entry_recently_used():
    cache = make_cache(max_entries=2)
    put(cache, [1, 1, 1])
    put(cache, [2, 2, 2])
    assert cache.lookup([1, 1, 1, 5])[1] == 3
    put(cache, [3, 3, 3])
    assert cache.keys() == [(1, 1, 1), (3, 3, 3)]
    assert cache.stats.evicted == 1


@pytest.mark.parametrize("max_entries, max_bytes", [(0, 10_000), (8, 0), (0, 0)])
def test_a_zero_bound_turns_the_cache_off(max_entries, max_bytes):
    cache = make_cache(max_entries=max_entries, max_bytes=max_bytes)
    assert not cache.enabled
    assert put(cache, [1, 2, 3]) is False
    assert cache.lookup([1, 2, 3, 4]) == (None, 0)
    assert len(cache) == 0 and cache.stats == PromptCacheStats()


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        make_cache(max_entries=-1)


def test_stats_flatten_for_heartbeats():
    cache = make_cache()
    put(cache, [1, 2, 3])
    cache.lookup([1, 2, 3, 4])
    cache.bypass()
    flat = cache.stats.as_dict()
    assert flat["prompt_cache_hits"] == 1 and flat["prompt_cache_bypassed"] == 1
    assert flat["prompt_cache_bytes_held"] == 30 and flat["prompt_cache_entries"] == 1
    assert all(isinstance(v, int) for v in flat.values())
    cache.clear()
    assert cache.stats.bytes_held == 0 and len(cache) == 0 and cache.stats.hits == 1


ops = st.lists(st.tuples(st.sampled_from(["store", "lookup"]), st.lists(st.integers(0, 3), min_size=1, max_size=12)),
               max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, max_entries=st.integers(1, 5), max_bytes=st.integers(0, 200))
def test_bounds_and_entries_hold_under_any_sequence(ops, max_entries, max_bytes):
    cache = make_cache(max_entries=max_entries, max_bytes=max_bytes)
    for op, tokens in ops:
        if op == "store":
            put(cache, tokens)
        else:
            kv, n = cache.lookup(tokens)
            if kv is not None:
                assert kv.tokens == tokens[:n] and 0 < n < len(tokens)
                kv.tokens.append(99)  # a running sequence may do anything with its copy
        held = [e for e in cache._entries.values()]
        assert len(held) <= max_entries
        assert cache.stats.bytes_held == sum(e.nbytes for e in held) <= max_bytes
        assert all(list(e.tokens) == e.kv.tokens for e in held)  # every entry holds exactly its key


@pytest.mark.parametrize("env, want", [
    ({}, (64, 512 * 1024 * 1024)),
    ({"MLX_FLEET_PROMPT_CACHE_ENTRIES": "3", "MLX_FLEET_PROMPT_CACHE_BYTES": "1000"}, (3, 1000)),
    ({"MLX_FLEET_PROMPT_CACHE_ENTRIES": "0"}, (0, 512 * 1024 * 1024)),
])
def test_config_reads_the_bounds_from_the_environment(env, want):
    from actors.config_load import load_config

    b = load_config(env=env).batching
    assert (b.prompt_cache_entries, b.prompt_cache_bytes) == want


def test_config_refuses_negative_bounds_and_cli_wins():
    from actors.config import ConfigError
    from actors.config_load import load_config

    with pytest.raises(ConfigError, match="prompt_cache"):
        load_config(env={"MLX_FLEET_PROMPT_CACHE_BYTES": "-1"})
    cfg = load_config(env={"MLX_FLEET_PROMPT_CACHE_BYTES": "5"}, overrides={"prompt_cache_bytes": 7})
    assert cfg.batching.prompt_cache_bytes == 7 and cfg.models[0].batching.prompt_cache_bytes == 7


def test_labels_name_the_entries_held_and_follow_evictions() -> None:
    cache = make_cache(max_entries=2)
    cache.store([1, 2, 3], FakeKV([1, 2, 3]), label="r1")
    cache.store([1, 2, 3, 4, 5], FakeKV([1, 2, 3, 4, 5]), label="r2")  # extends r1's: r1's entry goes
    assert cache.labels() == ["r2"]
    cache.store([7, 8], FakeKV([7, 8]), label="r3")
    cache.store([9, 9], FakeKV([9, 9]), label="r4")  # past two entries: the least recently used goes
    assert cache.labels() == ["r3", "r4"]
    assert cache.store([7], FakeKV([7]), label="r5")  # covered by r3's entry: r3 is used, nothing new
    assert cache.labels() == ["r4", "r3"]
