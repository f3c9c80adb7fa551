"""The systems benches/compare.py runs, one adapter class each (see base.py).

The SQLite-based systems always run.  The server-based peers (servers.py)
are registered in SYSTEMS only where their server answers and their client
libraries are installed; server_peers() says, for each, what it runs against
or why it was skipped.
"""
from __future__ import annotations

from typing import Dict, List, Tuple, Type

from .apsw_floor import ApswFloor
from .base import Adapter
from .dramatiq_redis import Dramatiq
from .headrace import Headrace
from .huey_redis import HueyRedis
from .huey_sqlite import Huey
from .lite_queue import LiteQueue
from .persist_queue import PersistQueue
from .procrastinate_pg import Procrastinate
from .rq_redis import Rq
from .servers import ServerAdapter, answers

__all__ = ["ADAPTERS", "SERVER_PEERS", "SYSTEMS", "Adapter", "answers", "server_peers"]

_LOCAL: Tuple[Type[Adapter], ...] = (Headrace, Huey, PersistQueue, LiteQueue, ApswFloor)
#: Server-based peers, in table order: Redis (rq, huey-redis, dramatiq), then PostgreSQL (procrastinate).
SERVER_PEERS: Tuple[Type[ServerAdapter], ...] = (Rq, HueyRedis, Dramatiq, Procrastinate)
#: Every adapter by name, registered here or not: a figure's processes look theirs up here.
ADAPTERS: Dict[str, Type[Adapter]] = {a.name: a for a in _LOCAL + SERVER_PEERS}
#: Every system that runs here, in table order; headrace first (the ratios are against it).
SYSTEMS: Dict[str, Type[Adapter]] = {a.name: a for a in _LOCAL}
SYSTEMS.update({a.name: a for a in SERVER_PEERS if a.registration() is None})


def server_peers() -> List[Tuple[str, str]]:
    """(system, status) for each server-based peer: "skipped: <why>" (no
    server, a library missing, a server it cannot use) or
    "available: <server, version, durability read back>"."""
    out = []
    for a in SERVER_PEERS:
        why = a.available()
        out.append((a.name, f"skipped: {why}" if why else f"available: {a.server_info()}"))
    return out
