"""The systems benches/compare.py runs, one adapter class each (see base.py)."""
from __future__ import annotations

import socket
from typing import Dict, List, Tuple, Type

from .apsw_floor import ApswFloor
from .base import Adapter
from .headrace import Headrace
from .huey_sqlite import Huey
from .lite_queue import LiteQueue
from .persist_queue import PersistQueue

#: Every system, in table order; headrace first (the ratios are against it).
SYSTEMS: Dict[str, Type[Adapter]] = {a.name: a for a in (Headrace, Huey, PersistQueue, LiteQueue, ApswFloor)}

#: Server-based peers: (systems, host, port, server name).  They run only where
#: the server answers on the loopback address; none has an adapter yet, so
#: a live server is reported rather than silently ignored.
SERVER_PEERS: List[Tuple[str, str, int, str]] = [
    ("rq, huey-redis (RedisHuey), dramatiq", "127.0.0.1", 6379, "Redis"),
    ("procrastinate", "127.0.0.1", 5432, "PostgreSQL"),
]


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Does something accept TCP connections on host:port?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def server_peers() -> List[Tuple[str, str]]:
    """(systems, status) for each server-based peer group."""
    out = []
    for systems, host, port, server in SERVER_PEERS:
        if answers(host, port):
            status = (f"not run: {server} answers on {host}:{port}, but these adapters are not written yet "
                      f"(no {server} to test them against where this script was written)")
        else:
            status = f"skipped: no {server} on {host}:{port}"
        out.append((systems, status))
    return out
