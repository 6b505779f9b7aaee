"""Cache-aware routing in the broker state: the replica holding the prefix, the imbalance guard, affinity,
and the prefix index rebuilt after a worker or a broker restarts (broker/routing.py, broker/prefix_index.py)."""

from __future__ import annotations

from typing import Any

import pytest

from actors.clock import FakeClock
from actors.prefix_keys import token_keys
from actors.protocol import Disconnect, Prefixes, Ready
from broker.prefix_index import PrefixIndex
from broker.routing import RoutingSettings
from broker.status import make_status
from tests.unit.broker_harness import Fleet, dispatched, worker_outs

pytestmark = pytest.mark.timeout(30)

DOC = list(range(1000, 1160))  # 160 token ids: ten prefix blocks
OTHER = list(range(5000, 5160))


def fleet(capacity: int = 4, **routing: Any) -> tuple[Fleet, bytes, bytes]:
    f = Fleet(models=("a",), routing=RoutingSettings(**routing))
    wa = f.ready("wa", capacity=capacity)
    f.clock.advance(1.0)
    wb = f.ready("wb", capacity=capacity)
    return f, wa, wb


def holds(f: Fleet, identity: bytes, tokens: list[int], *, full: bool = True) -> None:
    f.from_worker(identity, Prefixes(identity.decode(), full, token_keys(tokens)))


def send(f: Fleet, rid: str, tokens: list[int], **fields: Any) -> bytes | None:
    """Generate ``rid`` with these prompt tokens; the worker it went to (None: it waits)."""
    outs = f.generate(rid=rid, prompt_tokens=tokens, **fields)
    placed = dispatched(outs)
    return placed[0][0] if placed else None


def reasons(f: Fleet) -> dict[str, int]:
    return {k: v for k, v in f.state.router.counts["a"].reasons.items() if v}


def test_a_request_goes_to_the_replica_holding_its_prefix() -> None:
    f, wa, wb = fleet()
    holds(f, wb, DOC[:96])  # six of DOC's ten blocks
    assert send(f, "r1", DOC) == wb  # wa is the least recently used: least-loaded routing would pick it
    assert send(f, "r2", OTHER) == wa  # held nowhere: the least loaded (wb now runs one)
    assert reasons(f) == {"prefix": 1, "least_loaded": 1}
    counts = f.state.router.counts["a"]
    assert counts.blocks_sum == 6 and counts.blocks[3] == 1  # bucket <= 8 blocks
    f.fail_all()
    f.check()


@pytest.mark.parametrize(("held_tokens", "min_match", "goes_to_holder"), [
    (64, 0.5, False),  # four of ten blocks: mostly a prefill anyway; a shared beginning must not pull it over
    (80, 0.5, True),  # five of ten: enough
    (64, 0.4, True),
    (16, 0.0, True),  # any prefix at all
])
def test_a_replica_must_hold_enough_of_the_prompt(held_tokens: int, min_match: float, goes_to_holder: bool) -> None:
    f, wa, wb = fleet(min_match=min_match)
    holds(f, wb, DOC[:held_tokens])
    assert send(f, "r1", DOC) == (wb if goes_to_holder else wa)
    f.fail_all()
    f.check()


def test_the_longest_prefix_wins_and_ties_go_to_the_least_loaded() -> None:
    f, wa, wb = fleet()
    holds(f, wa, DOC[:80])
    holds(f, wb, DOC[:112])
    assert send(f, "r1", DOC) == wb
    holds(f, wa, DOC[:112])  # both hold seven blocks now; wb runs one request
    assert send(f, "r2", DOC) == wa
    f.fail_all()
    f.check()


def test_the_imbalance_guard_overrides_the_prefix() -> None:
    f, wa, wb = fleet(capacity=8, balance_abs=2, balance_rel=1.5)
    holds(f, wb, DOC)
    placed = [send(f, f"r{i}", DOC) for i in range(3)]
    assert placed == [wb, wb, wb]  # loads 0 vs 1, then 2: within the guard
    # Loads 0 and 3: more than 2 apart and more than 1.5 times: the least loaded takes it.
    assert send(f, "r3", DOC) == wa
    assert reasons(f) == {"prefix": 3, "imbalance": 1}
    f.fail_all()
    f.check()


def test_a_full_replica_holding_the_prefix_leaves_the_request_to_a_free_one() -> None:
    f, wa, wb = fleet(capacity=1)
    holds(f, wb, DOC)
    assert send(f, "r1", DOC) == wb
    assert send(f, "r2", DOC) == wa  # wb is full: the request does not wait for it
    f.fail_all()
    f.check()


def test_affinity_keys_still_win() -> None:
    f, wa, wb = fleet()
    assert send(f, "r1", OTHER, affinity="conv-1") == wa  # binds conv-1 to wa
    holds(f, wb, DOC)
    assert send(f, "r2", DOC, affinity="conv-1") == wa  # wb holds the prefix; the key says wa
    assert reasons(f) == {"least_loaded": 1, "affinity": 1}
    f.fail_all()
    f.check()


def test_least_loaded_routing_ignores_the_prefixes() -> None:
    f, wa, wb = fleet(policy="least_loaded")
    holds(f, wb, DOC)
    assert send(f, "r1", DOC) == wa
    assert reasons(f) == {"least_loaded": 1}
    f.fail_all()
    f.check()


def test_a_lone_replica_never_hashes_the_prompt() -> None:
    f = Fleet(models=("a",))
    wa = f.ready("wa")
    assert send(f, "r1", DOC) == wa
    assert f.state.requests[f.key(rid="r1")].prefix_keys is None
    f.fail_all()
    f.check()


def test_reports_add_and_remove_keys() -> None:
    f, wa, wb = fleet()
    holds(f, wb, DOC)
    f.from_worker(wb, Prefixes("wb", False, [], token_keys(DOC)[2:]))  # evicted past two blocks
    assert f.state.router.prefixes.size(wb) == 2
    f.from_worker(wb, Prefixes("wb", False, [], token_keys(DOC)[:2]))
    assert f.state.router.prefixes.size(wb) == 0
    assert send(f, "r1", DOC) == wa  # held nowhere any more
    f.fail_all()
    f.check()


def test_the_index_recovers_after_a_worker_restart() -> None:
    f, wa, wb = fleet()
    holds(f, wb, DOC)
    # wb's process restarts: it registers again, with an empty cache, and says so in full.
    f.record(f.state.handle_ready(wb, Ready(worker_id="wb", model="a", capacity=4, pid=101, host="h")))
    assert f.state.router.prefixes.size(wb) == 0
    holds(f, wb, [])
    assert send(f, "r1", DOC) == wa  # least loaded: nothing held
    # It serves DOC once and its cache reports the entry: the next request follows it there.
    holds(f, wb, DOC, full=False)
    assert send(f, "r2", DOC) == wb
    f.fail_all()
    f.check()


def test_a_lost_worker_takes_its_keys_with_it() -> None:
    f, wa, wb = fleet()
    holds(f, wb, DOC)
    f.from_worker(wb, Disconnect(worker_id="wb", reason="bye"))
    assert f.state.router.prefixes.size(wb) == 0
    assert send(f, "r1", DOC) == wa
    f.fail_all()
    f.check()


def test_the_index_recovers_after_a_broker_restart() -> None:
    f, wa, wb = fleet()
    holds(f, wb, DOC)
    # A new broker: the workers register with it (ready), each followed by a full report.
    g, ga, gb = fleet()
    assert send(g, "r0", DOC) == ga  # before the reports: nothing is known
    holds(g, gb, DOC)
    holds(g, ga, OTHER)
    assert send(g, "r1", DOC) == gb and send(g, "r2", OTHER) == ga
    for x in (f, g):
        x.fail_all()
        x.check()


def test_a_report_from_an_unknown_worker_is_not_kept() -> None:
    f, wa, wb = fleet()
    outs = f.from_worker(b"ghost", Prefixes("ghost", True, token_keys(DOC)))
    assert [o.body.reason for o in worker_outs(outs, Disconnect)] == ["unknown worker, send ready"]
    assert f.state.router.prefixes.size(b"ghost") == 0


def test_status_shows_the_keys_held_and_the_routing() -> None:
    f, wa, wb = fleet()
    holds(f, wb, DOC)
    send(f, "r1", DOC)
    status = make_status(f.state)
    rows = {w["worker_id"]: w for w in status["models"]["a"]["workers"]}
    assert rows["wb"]["prefixes"]["keys"] == 10 and rows["wa"]["prefixes"]["keys"] == 0
    assert status["models"]["a"]["routed"]["prefix"] == 1
    assert status["routing"]["policy"] == "cache_aware" and status["routing"]["balance_abs"] == 8
    f.fail_all()


def test_the_index_is_bounded_per_worker() -> None:
    index = PrefixIndex(FakeClock(), max_keys=5)
    index.apply(b"w", Prefixes("w", True, token_keys(DOC)))
    assert index.size(b"w") == 5 and index.dropped == 5
    assert index.matched(b"w", token_keys(DOC)) == 5
    index.apply(b"w", Prefixes("w", True, token_keys(OTHER)[:3]))  # full: replaces
    assert index.size(b"w") == 3 and index.matched(b"w", token_keys(DOC)) == 0

