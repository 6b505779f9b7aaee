"""Where the conformance suite's fleet comes from.

By default the suite starts its own fleets (the ``demo-small`` model). With
``--connect ADDR`` it checks the fleet at ADDR instead; the few tests that need
to shape or break the fleet (kill a worker, a memory budget, a model with no
worker) are then skipped, each saying why.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import pytest

from tests.integration.clients import RawClient

MODEL = "demo-small"
IDLE_MODEL = "idle"  # configured with no worker: its requests end `unavailable`
QUEUE_LIMIT = 8
DECODE_CAPACITY = 2
NO_WORKER_TIMEOUT_S = 1.0


@dataclasses.dataclass
class Target:
    """The fleet under test: its address, and the running fleet when this suite started it."""

    addr: str
    model: str
    fleet: Any = None  # tests.integration.fleets.RunningFleet, or None with --connect

    def local(self, why: str) -> Any:
        """The fleet this suite started; skip the test (saying ``why``) when it runs with --connect."""
        if self.fleet is None:
            pytest.skip(f"needs a fleet this suite starts: {why}")
        return self.fleet


def _start(**overrides: Any) -> Any:
    from actors.config import BatchingConfig
    from tests.integration.fleets import start_fleet

    batching = BatchingConfig(decode_capacity=DECODE_CAPACITY, admission_batch=DECODE_CAPACITY)
    return start_fleet(transport="tcp", batching=batching, **overrides)


def _weights_bytes(source: str) -> int:
    from workers.models.sources import weights_bytes

    size = weights_bytes(source)
    assert size, f"cannot size {source}"
    return size


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The main fleet: a served model, a model with no worker, a small queue, a memory budget."""
    addr = request.config.getoption("--connect")
    if addr:
        wire = RawClient(addr)
        try:
            model = wire.first_model()["name"]
        finally:
            wire.close()
        yield Target(addr, model)
        return
    # One replica fits the budget; a second does not.
    budget = int(_weights_bytes(MODEL) * 1.5)
    fleet = _start(models=((MODEL, MODEL, 1), (IDLE_MODEL, MODEL, 0)), queue_limit=QUEUE_LIMIT,
                   no_worker_timeout_s=NO_WORKER_TIMEOUT_S, memory_budget_bytes=budget)
    try:
        yield Target(fleet.cfg.frontend, MODEL, fleet)
    finally:
        fleet.stop()


@pytest.fixture(scope="session")
def expendable(request: pytest.FixtureRequest) -> Iterator[Target]:
    """A fleet of its own, for tests that kill its worker (no memory budget)."""
    if request.config.getoption("--connect"):
        pytest.skip("needs a fleet this suite starts: a second fleet it may break")
    fleet = _start(models=((MODEL, MODEL, 1),), restart_backoff_s=0.2)
    try:
        yield Target(fleet.cfg.frontend, MODEL, fleet)
    finally:
        fleet.stop()


@pytest.fixture
def wire(target: Target) -> Iterator[RawClient]:
    """A fresh raw client on the fleet under test."""
    w = RawClient(target.addr)
    try:
        yield w
    finally:
        w.close()
