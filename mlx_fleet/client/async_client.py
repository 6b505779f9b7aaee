"""``AsyncClient``: the asyncio twin of :class:`mlx_fleet.client.sync_client.Client` (docs/clients.md).

Same calls, same behaviour, same public types, awaited. One reader task routes
replies to their requests and one watcher task follows the connection, both
through the shared :class:`mlx_fleet.client.core.ClientCore`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from actors.protocol import (
    DEFAULT_CONNECT, Addressed, ControlReply, Generate, Load, Message, Models, ModelsReply, Status, StatusReply, Unload,
)
from mlx_fleet.client.core import (
    DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_RECOVER_TIMEOUT_S, DEFAULT_TIMEOUT_S, R, ClientShell, Completion, Pending,
    StreamChunk, encode_checked, local_timeout_s, make_generate, new_request_id,
)


class AsyncClient(ClientShell[zmq.asyncio.Socket]):
    """An asyncio client: many concurrent requests over one socket. See :class:`mlx_fleet.client.sync_client.Client`."""

    def __init__(self, connect: str = DEFAULT_CONNECT, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, curve: dict[str, bytes] | None = None,
                 ctx: zmq.asyncio.Context | None = None, recover_timeout_s: float = DEFAULT_RECOVER_TIMEOUT_S) -> None:
        super().__init__(ctx or zmq.asyncio.Context(), ctx is None, connect, timeout_s=timeout_s,
                         connect_timeout_s=connect_timeout_s, curve=curve, recover_timeout_s=recover_timeout_s)
        self._wakeups: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reader and the connection watcher, and close the socket (linger 0); open streams end."""
        if self.closed:
            return
        self.closed = True
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._wakeups.clear()
        self._close_sockets()

    # ---- plumbing ------------------------------------------------------------------

    def _ensure_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read())
        if self._watcher is None or self._watcher.done():
            # Events from before anything watched: they set the link's state and concern no open request.
            now_monitor = zmq.SyncSocket.shadow(self._monitor.underlying)
            while now_monitor.poll(0):
                self.core.on_event(parse_monitor_message(now_monitor.recv_multipart())["event"])
            for msg in self.core.take_resends():
                self._now_sock.send_multipart(encode_checked(msg), flags=zmq.NOBLOCK)
            self._watcher = loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            self.core.on_event(parse_monitor_message(await self._monitor.recv_multipart())["event"])
            for msg in self.core.take_resends():  # a broker is back: what showed no output goes again
                await self.sock.send_multipart(encode_checked(msg))

    async def _read(self) -> None:
        while True:
            self.core.on_frames(await self.sock.recv_multipart())

    def _open(self, msg: Addressed, wait_s: float) -> tuple[Pending, asyncio.Future[Any]]:
        """Register a request and start sending it; await the returned future before reading."""
        frames = encode_checked(msg)
        self._ensure_tasks()
        wake = asyncio.Event()
        p = self.core.open(msg.request_id or "", msg.TYPE, wait_s, notify=wake.set,
                           request=msg if isinstance(msg, Generate) else None)
        self._wakeups[p.request_id] = wake
        try:
            sent = self.sock.send_multipart(frames)
        except BaseException:
            self._forget(p.request_id)
            raise
        return p, asyncio.ensure_future(sent)

    def _forget(self, request_id: str) -> None:
        super()._forget(request_id)
        self._wakeups.pop(request_id, None)

    async def _next(self, p: Pending) -> Message:
        """The next reply of ``p``, waiting for it; a local failure (timeout, lost broker) raises."""
        wake = self._wakeups[p.request_id]
        while True:
            msg, left_s = self.core.next_or_wait(p)
            if msg is not None:
                return msg
            wake.clear()
            try:
                async with asyncio.timeout(left_s):
                    await wake.wait()
            except TimeoutError:
                pass

    async def _call(self, msg: Addressed, reply_type: type[R], timeout_s: float | None) -> R:
        msg.request_id = new_request_id()
        p, sent = self._open(msg, timeout_s or self.timeout_s)
        try:
            await sent
            while True:
                reply = self.core.reply(p, await self._next(p), reply_type)
                if reply is not None:
                    return reply
        finally:
            self._forget(p.request_id)

    # ---- calls ------------------------------------------------------------------------

    async def models(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """The fleet's models."""
        return (await self._call(Models(), ModelsReply, timeout_s)).models

    async def status(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The fleet's status map."""
        return (await self._call(Status(), StatusReply, timeout_s)).status

    async def load(self, model: str, source: str, *, replicas: int = 1, on_demand: bool = False,
                   idle_unload_s: float | None = None, dtype: str | None = None,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """As :meth:`mlx_fleet.client.sync_client.Client.load`."""
        msg = Load(model=model, source=source, replicas=replicas, on_demand=on_demand, idle_unload_s=idle_unload_s,
                   dtype=dtype)
        return (await self._call(msg, ControlReply, timeout_s)).to_map()

    async def unload(self, model: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """As :meth:`mlx_fleet.client.sync_client.Client.unload`."""
        return (await self._call(Unload(model=model), ControlReply, timeout_s)).to_map()

    async def cancel(self, request_id: str) -> None:
        """As :meth:`mlx_fleet.client.sync_client.Client.cancel`: fire and forget, never waits."""
        self._cancel_now(request_id)

    def stream(self, prompt: str | None = None, *, model: str, **options: Any) -> "AsyncStream":
        """As :meth:`mlx_fleet.client.sync_client.Client.stream`: ``async for`` the result for chunks."""
        options.setdefault("stream", True)
        msg = make_generate(model, prompt, **options)
        p, sent = self._open(msg, local_timeout_s(msg.timeout_s, self.timeout_s))
        return AsyncStream(self, p, sent)

    async def generate(self, prompt: str | None = None, *, model: str, **options: Any) -> Completion:
        """As :meth:`mlx_fleet.client.sync_client.Client.generate`."""
        options.setdefault("stream", False)
        async with self.stream(prompt, model=model, **options) as stream:
            async for _ in stream:
                pass
        assert stream.completion is not None
        return stream.completion


class AsyncStream:
    """As :class:`mlx_fleet.client.sync_client.SyncStream`, with ``async for``, ``aclose()`` and ``async with``."""

    def __init__(self, client: AsyncClient, pending: Pending, sent: asyncio.Future[Any]) -> None:
        self.client = client
        self.request_id = pending.request_id
        self.completion: Completion | None = None
        self._pending = pending
        self._sent: asyncio.Future[Any] | None = sent
        self._closed = False

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> StreamChunk:
        if self.completion is not None or self._closed:
            raise StopAsyncIteration
        try:
            if self._sent is not None:
                await self._sent
                self._sent = None
            while True:
                item = self.client.core.advance(self._pending, await self.client._next(self._pending))
                if isinstance(item, Completion):
                    self.completion = item
                    break
                if item is not None:
                    return item
        except BaseException:
            self._close_now()
            raise
        self._close_now()
        raise StopAsyncIteration

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sent is not None and not self._sent.done():
            self._sent.cancel()  # never sent: nothing to cancel in the fleet
        elif self._sent is not None and not self._sent.cancelled():
            self._sent.exception()  # retrieved, so a failed send leaves no warning behind
        self.client._abandon(self._pending)

    async def aclose(self) -> None:
        """Stop reading; cancel the request in the fleet unless it has ended."""
        self._close_now()

    def __del__(self) -> None:
        try:
            self._close_now()
        except Exception:  # the client may be closed, or the interpreter shutting down
            pass
