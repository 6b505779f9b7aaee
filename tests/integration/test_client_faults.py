"""The client libraries: cancel in the fleet when they give up, fail fast with no broker, one shape.

The cancel tests start a long request (thousands of tokens, tens of seconds),
give up on it locally, and check that the fleet freed the worker slot within
seconds. The connection tests use a stand-in broker (a bare ROUTER).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import msgpack
import pytest
import zmq

from actors.protocol import PROTOCOL_TAG
from mlx_fleet.client import AsyncClient, Client, Completion, FleetError, StreamChunk
from tests.integration.fleets import fleet_status, start_fleet
from tests.waiting import wait_for

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


# ---- no broker yet, a broker that comes late, a broker that restarts ----------------------------


def test_no_broker_fails_fast_with_unavailable_after_the_connect_wait(ipc_dir):
    addr = f"ipc://{ipc_dir}/nobody"
    with Client(addr, timeout_s=60, connect_timeout_s=0.3) as client:
        start_s = time.monotonic()
        with pytest.raises(FleetError) as info:
            client.generate("x", model="demo")
        assert time.monotonic() - start_s < 10  # not the 60 s local timeout
    assert info.value.code == "unavailable" and "connect_timeout_s=0.3s" in info.value.message

    async def main() -> FleetError:
        async with AsyncClient(addr, timeout_s=60, connect_timeout_s=0.3) as client:
            with pytest.raises(FleetError) as info:
                await client.status()
            return info.value

    err = asyncio.run(main())
    assert err.code == "unavailable" and "no broker is connected" in err.message


class StandInBroker:
    """A bare ROUTER that answers `status` and records who asked (the sender's routing id)."""

    def __init__(self, addr: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(addr)
        self.callers: list[bytes] = []

    def answer_one(self, timeout_s: float = 10.0) -> None:
        assert self.sock.poll(timeout_s * 1000), "no request reached the stand-in broker"
        identity, _tag, payload = self.sock.recv_multipart()
        self.callers.append(identity)
        rid = msgpack.unpackb(payload)["request_id"]
        reply = {"type": "status_reply", "request_id": rid, "status": {"stand_in": True}}
        self.sock.send_multipart([identity, PROTOCOL_TAG, msgpack.packb(reply)])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_a_broker_that_comes_within_the_connect_wait_gets_the_request(ipc_dir):
    addr = f"ipc://{ipc_dir}/late"
    with Client(addr, timeout_s=30, connect_timeout_s=20) as client:
        broker: list[StandInBroker] = []
        later = threading.Timer(0.5, lambda: broker.append(StandInBroker(addr)))
        later.start()
        answerer = threading.Thread(target=lambda: (later.join(), broker[0].answer_one()))
        answerer.start()
        try:
            assert client.status() == {"stand_in": True}
        finally:
            answerer.join(15)
            for b in broker:
                b.close()


def test_a_client_keeps_its_routing_id_across_a_broker_restart(ipc_dir):
    """Its explicit routing id lets a restarted broker route to the same client (docs/protocol.md)."""
    addr = f"ipc://{ipc_dir}/restart"
    with Client(addr, timeout_s=10, connect_timeout_s=10) as client:
        first = StandInBroker(addr)
        answerer = threading.Thread(target=first.answer_one)
        answerer.start()
        client.status()
        answerer.join(10)
        first.close()
        second = StandInBroker(addr)
        try:
            answerer = threading.Thread(target=second.answer_one)
            answerer.start()
            client.status()
            answerer.join(10)
        finally:
            second.close()
    assert first.callers == second.callers == [client.routing_id]


# ---- one client, several requests ---------------------------------------------------------------


def test_a_sync_client_carries_interleaved_streams(fleet):
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        a = client.stream("First story", model="demo", max_tokens=12)
        b = client.stream("Second story", model="demo", max_tokens=12)
        text_b = "".join(c.text for c in b)  # a's replies wait in its own buffer meanwhile
        text_a = "".join(c.text for c in a)
        assert a.completion is not None and b.completion is not None
        assert (text_a, text_b) == (a.completion.text, b.completion.text)
        assert a.completion.usage["completion_tokens"] == b.completion.usage["completion_tokens"] == 12
        assert client.generate("First story", model="demo", max_tokens=12).text == text_a


def test_a_request_id_in_flight_on_the_client_is_refused_locally(fleet):
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        first = client.stream("Tell a long story", model="demo", max_tokens=LONG_TOKENS, request_id="mine")
        with pytest.raises(FleetError) as info:
            client.stream("again", model="demo", request_id="mine")
        assert info.value.code == "duplicate_request"
        first.close()  # cancels it in the fleet
    assert_freed(fleet.cfg.frontend)


def test_both_clients_give_the_same_public_types(fleet):
    addr = fleet.cfg.frontend
    with Client(addr, timeout_s=60) as client:
        stream = client.stream("Same shape", model="demo", max_tokens=6, seed=1)
        sync_chunks = list(stream)
        sync_done = stream.completion

    async def main() -> tuple[list[StreamChunk], Completion | None]:
        async with AsyncClient(addr, timeout_s=60) as client:
            stream = client.stream("Same shape", model="demo", max_tokens=6, seed=1)
            return [c async for c in stream], stream.completion

    async_chunks, async_done = asyncio.run(main())
    assert all(type(c) is StreamChunk for c in sync_chunks + async_chunks)
    assert [c.text for c in sync_chunks] == [c.text for c in async_chunks]
    assert sync_done is not None and async_done is not None
    assert (sync_done.text, sync_done.token_ids) == (async_done.text, async_done.token_ids)
