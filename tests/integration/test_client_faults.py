"""The client library cancels in the fleet on a local timeout and on interruption.

Each test starts a long request (thousands of tokens, tens of seconds), gives up
on it locally, and checks that the fleet freed the worker slot within seconds.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any

import pytest

from broker.client import AsyncClient, Client, FleetError
from tests.integration.fleetutil import fleet_status, start_fleet, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LONG_TOKENS = 5000  # far longer than any test waits: it only ends early if cancelled


@pytest.fixture(scope="module")
def fleet():
    f = start_fleet()
    yield f
    f.stop()


def busy(addr: str) -> bool:
    """True while the fleet holds any request or any worker slot."""
    st = fleet_status(addr)
    return st["requests"] > 0 or any(w["in_flight"] for m in st["models"].values() for w in m["workers"])


def assert_freed(addr: str) -> None:
    wait_for(lambda: not busy(addr), timeout_s=5, what="the fleet to drop the abandoned request")


def test_sync_local_timeout_cancels_in_the_fleet(fleet):
    addr = fleet.cfg.frontend
    with Client(addr, timeout_s=0.5) as client:
        with pytest.raises(FleetError) as info:
            client.generate("Tell a long story", model="demo", max_tokens=LONG_TOKENS)
    assert info.value.code == "timeout"
    assert_freed(addr)


def test_sync_break_out_of_a_stream_cancels(fleet):
    addr = fleet.cfg.frontend
    with Client(addr, timeout_s=30) as client:
        stream = client.stream("Tell a long story", model="demo", max_tokens=LONG_TOKENS)
        for _ in stream:
            break
        del stream
        assert_freed(addr)


def test_sync_keyboard_interrupt_cancels(fleet):
    """Ctrl-C while blocked waiting for chunks: the request is cancelled, the interrupt propagates."""
    addr = fleet.cfg.frontend

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, interrupt)
    try:
        with Client(addr, timeout_s=30) as client:
            stream = client.stream("Tell a long story", model="demo", max_tokens=LONG_TOKENS)
            chunks = iter(stream)
            next(chunks)
            timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                for _ in chunks:
                    pass
            timer.join()
            assert_freed(addr)
    finally:
        signal.signal(signal.SIGINT, old)


def test_async_task_cancellation_cancels_in_the_fleet(fleet):
    addr = fleet.cfg.frontend

    async def main() -> None:
        async with AsyncClient(addr, timeout_s=30) as client:
            task = asyncio.create_task(client.generate("Tell a long story", model="demo", max_tokens=LONG_TOKENS))
            deadline = asyncio.get_running_loop().time() + 10
            while not await asyncio.to_thread(busy, addr):
                assert asyncio.get_running_loop().time() < deadline, "request never started"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(assert_freed, addr)

    asyncio.run(main())


def test_async_local_timeout_cancels_in_the_fleet(fleet):
    addr = fleet.cfg.frontend

    async def main() -> str:
        async with AsyncClient(addr, timeout_s=0.5) as client:
            try:
                await client.generate("Tell a long story", model="demo", max_tokens=LONG_TOKENS)
            except FleetError as exc:
                return exc.code
            return "finished"

    assert asyncio.run(main()) == "timeout"
    assert_freed(addr)


def test_oversize_request_is_refused_before_sending(fleet):
    addr = fleet.cfg.frontend
    huge = "x" * (5 * 1024 * 1024)
    with Client(addr, timeout_s=10) as client:
        with pytest.raises(FleetError) as info:
            client.generate(huge, model="demo")
        assert info.value.code == "bad_request" and "max_frame_bytes" in info.value.message
        assert client.generate("fine", model="demo", max_tokens=2).token_ids  # the connection is intact

    async def main() -> str:
        async with AsyncClient(addr, timeout_s=10) as client:
            try:
                await client.generate(huge, model="demo")
            except FleetError as exc:
                return exc.code
            return "sent"

    assert asyncio.run(main()) == "bad_request"


def test_clients_get_a_clear_error_when_no_broker_answers():
    with Client("ipc:///tmp/mlxf-nobody-here", timeout_s=0.5) as client:
        with pytest.raises(FleetError) as info:
            client.status()
    assert info.value.code == "timeout"

    async def main() -> str:
        async with AsyncClient("ipc:///tmp/mlxf-nobody-here", timeout_s=0.5) as client:
            try:
                await client.generate("x", model="demo")
            except FleetError as exc:
                return exc.code
            return "answered"

    assert asyncio.run(main()) == "timeout"
