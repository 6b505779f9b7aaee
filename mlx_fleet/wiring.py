"""The wiring of a fleet: which entry point runs each child, and what a model source is.

The supervisor (:mod:`actors.supervisor`) imports no entry point and nothing of
``broker`` or ``workers``; it gets them here.
"""

from __future__ import annotations

from actors.collector import run_collector
from actors.config import FleetConfig
from actors.supervisor import Supervisor, Wiring
from broker.broker import run_broker
from mlx_fleet.gateway.server import run_gateway
from mlx_fleet.worker_entry import run_local_rank, run_local_worker
from workers.models.sources import check_source, weights_bytes

WIRING = Wiring(run_broker=run_broker, run_worker=run_local_worker, run_collector=run_collector,
                run_gateway=run_gateway, check_source=check_source, weights_bytes=weights_bytes,
                run_rank=run_local_rank)


def make_supervisor(cfg: FleetConfig) -> Supervisor:
    """A supervisor for ``cfg`` with the fleet's own entry points (not started)."""
    return Supervisor(cfg, WIRING)
