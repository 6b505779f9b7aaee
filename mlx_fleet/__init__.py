"""mlx-fleet: serve MLX language models, several models and replicas of each, behind one ZeroMQ endpoint.

This package is the public face and the composition root:

- :mod:`mlx_fleet.client`: the client library (``Client``, ``AsyncClient``), which imports only ``actors``;
- :mod:`mlx_fleet.gateway`: the OpenAI-compatible HTTP gateway, a client of the broker like any other;
- at its top, the ``mlx-fleet`` command line, the wiring of a fleet's children, the embedded
  fleet and the worker entry points: the only modules that import ``actors``, ``broker`` and
  ``workers`` together (docs/architecture.md).
"""

from mlx_fleet.client import AsyncClient, AsyncStream, Choice, Client, Completion, FleetError, StreamChunk, SyncStream

__all__ = ["AsyncClient", "AsyncStream", "Choice", "Client", "Completion", "FleetError", "StreamChunk", "SyncStream"]
