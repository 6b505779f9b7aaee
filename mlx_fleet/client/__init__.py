"""The client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio), documented in docs/clients.md.

Both share one socket-free core (:mod:`mlx_fleet.client.core`); :mod:`mlx_fleet.client.sync_client`
and :mod:`mlx_fleet.client.async_client` are its shells. This package imports nothing of ours
but ``actors``.
"""

from mlx_fleet.client.sync_client import (
    DEFAULT_CONNECT, DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, GRACE_S, AsyncClient, AsyncStream, Choice, Client,
    Completion, FleetError, StreamChunk, SyncStream, apply_curve_client, make_generate,
)

__all__ = [
    "DEFAULT_CONNECT", "DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "GRACE_S",
    "AsyncClient", "AsyncStream", "Choice", "Client", "Completion", "FleetError", "StreamChunk", "SyncStream",
    "apply_curve_client", "make_generate",
]
