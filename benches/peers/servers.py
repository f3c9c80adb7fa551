"""What the server-based peers share: where their server is, whether it
answers, a keyspace or database of each figure's own, and the durability
they read back.

A server peer runs only where its server answers (by default on the loopback
address: Redis on 6379, PostgreSQL on 5432; HEADRACE_COMPARE_REDIS_URL and
HEADRACE_COMPARE_PG_DSN point elsewhere) and its client libraries are
installed (``pip install '.[compare]'``); otherwise ``server_peers()`` says
why it was skipped.  The adapters neither start nor configure a server: they
read its durability settings back and report them.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import socket
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlparse

from .base import Adapter, version_of

REDIS_URL_ENV = "HEADRACE_COMPARE_REDIS_URL"
PG_DSN_ENV = "HEADRACE_COMPARE_PG_DSN"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Seconds a client waits for its server before a check gives up.
CONNECT_TIMEOUT = 3.0
#: What the Redis peers need to match WAL + synchronous=NORMAL.
REDIS_DURABILITY = {"appendonly": "yes", "appendfsync": "everysec"}
INSTALL_HINT = "pip install '.[compare]'"


def redis_url() -> str:
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def pg_dsn() -> str:
    return os.environ.get(PG_DSN_ENV) or DEFAULT_PG_DSN


def redis_address(url: str) -> Tuple[str, Optional[int]]:
    """(host, port) of a redis:// URL, or (socket path, None) for unix://."""
    u = urlparse(url)
    if u.scheme == "unix":
        return u.path, None
    return u.hostname or "127.0.0.1", u.port or 6379


def pg_address(dsn: str) -> Tuple[str, Optional[int]]:
    """(host, port) of a libpq URI or key=value string, or (socket path, None)
    when the host is a directory; host and port default as libpq's do
    (PGHOST, PGPORT), except that no host means 127.0.0.1 here."""
    if "://" in dsn:
        u = urlparse(dsn)
        q = parse_qs(u.query)
        host = unquote(u.hostname or "") or q.get("host", [""])[0]
        port: Any = u.port or q.get("port", [""])[0]
    else:
        kv = {k: v.strip("'") for k, v in re.findall(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)}
        host, port = kv.get("host") or kv.get("hostaddr", ""), kv.get("port", "")
    host = host or os.environ.get("PGHOST") or "127.0.0.1"
    port = int(port or os.environ.get("PGPORT") or 5432)
    if host.startswith("/"):
        return os.path.join(host, f".s.PGSQL.{port}"), None
    return host, port


def answers(host: str, port: Optional[int], timeout: float = 0.5) -> bool:
    """Does something accept connections on host:port (or on the unix socket
    `host` when port is None)?"""
    try:
        if port is None:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(timeout)
                s.connect(host)
            return True
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def where(address: Tuple[str, Optional[int]]) -> str:
    host, port = address
    return host if port is None else f"{host}:{port}"


def namespace(path: str) -> str:
    """The figure's own Redis key prefix or PostgreSQL database: hrbench_
    and 12 hex digits of its (fresh, temporary) directory's path, so that the
    figure's processes agree on it and the harness's cleanup finds it."""
    return "hrbench_" + hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:12]


class ServerAdapter(Adapter):
    """A peer that needs a server.  Subclasses set the server's name, the
    environment variable that locates it and the client modules it needs."""

    #: "Redis" or "PostgreSQL".
    server = ""
    #: Environment variable with the server's URL or DSN.
    env = ""
    #: Modules that must import (the peer itself and its database client).
    modules: Tuple[str, ...] = ()
    #: Client distribution whose version is reported beside the peer's.
    client_dist = ""

    @property
    def ns(self) -> str:
        return namespace(self.path)

    @classmethod
    def version(cls) -> str:
        return f"{version_of(cls.dist)} ({cls.client_dist} {version_of(cls.client_dist)})"

    @classmethod
    def location(cls) -> str:
        raise NotImplementedError

    @classmethod
    def address(cls) -> Tuple[str, Optional[int]]:
        raise NotImplementedError

    @classmethod
    def registration(cls) -> Optional[str]:
        """None if the client modules are installed and the server answers;
        otherwise why not.  Cheap (nothing is imported), as every process of
        compare.py runs it when it imports the peers."""
        why = []
        addr = cls.address()
        if not answers(*addr):
            why.append(f"no {cls.server} on {where(addr)} (start one, or set {cls.env})")
        missing = [m for m in cls.modules if importlib.util.find_spec(m) is None]
        if missing:
            why.append(f"{', '.join(missing)} not installed ({INSTALL_HINT})")
        return "; ".join(why) or None

    @classmethod
    def available(cls) -> Optional[str]:
        why = cls.registration()
        if why:
            return why
        for m in cls.modules:
            try:
                importlib.import_module(m)
            except ImportError as e:
                return f"{m} does not import: {e} ({INSTALL_HINT})"
        try:
            cls.server_info()
        except Exception as e:
            return f"{cls.server} answers on {where(cls.address())}, but: {type(e).__name__}: {e}"
        return None

    @classmethod
    def server_info(cls) -> str:
        """What the peer runs against: server, version, durability as read
        back (raises if the server cannot be used)."""
        raise NotImplementedError


def redis_durability(r: Any) -> Dict[str, Any]:
    """Redis version, appendonly and appendfsync as the server reads them back."""
    import redis
    out: Dict[str, Any] = {"server": f"Redis {r.info('server').get('redis_version', '?')}"}
    for k in REDIS_DURABILITY:
        try:
            out[k] = r.config_get(k).get(k, "?")
        except redis.ResponseError as e:  # CONFIG disabled or renamed on the server
            out[k] = f"? ({e})"
    if any(out[k] != v for k, v in REDIS_DURABILITY.items()):
        out["mismatch"] = ("not appendonly yes + appendfsync everysec, the closest match to WAL + "
                           "synchronous=NORMAL: run redis-server with --appendonly yes --appendfsync everysec")
    return out


class RedisAdapter(ServerAdapter):
    """A Redis peer: every key it makes contains its figure's namespace;
    cleanup() deletes them and the namespace's members of `global_sets`."""

    server = "Redis"
    env = REDIS_URL_ENV
    client_dist = "redis"
    durability = ("AOF with appendfsync everysec, as the server is configured (the adapter reads it back, it "
                  "sets nothing): the closest match to WAL + synchronous=NORMAL, a write is in the AOF (not "
                  "yet fsynced) when the client gets its reply and fsynced within a second, so a power loss "
                  "can lose the last second but not corrupt")
    #: Sets shared by every user of the library on the server (not namespaced).
    global_sets: Tuple[str, ...] = ()

    @classmethod
    def location(cls) -> str:
        return redis_url()

    @classmethod
    def address(cls) -> Tuple[str, Optional[int]]:
        return redis_address(redis_url())

    @staticmethod
    def client() -> Any:
        import redis
        return redis.Redis.from_url(redis_url(), socket_connect_timeout=CONNECT_TIMEOUT)

    @classmethod
    def server_info(cls) -> str:
        r = cls.client()
        try:
            d = redis_durability(r)
        finally:
            r.close()
        info = f"{d.pop('server')} at {where(cls.address())} (" + ", ".join(
            f"{k}={v}" for k, v in d.items() if k != "mismatch") + ")"
        if "mismatch" in d:
            info += f"; WARNING: {d['mismatch']}"
        return info

    def cleanup(self) -> None:
        r = self.client()
        try:
            ns = self.ns.encode()
            keys = list(r.scan_iter(match=f"*{self.ns}*", count=1000))
            for k in range(0, len(keys), 1000):
                r.delete(*keys[k:k + 1000])
            for s in self.global_sets:
                members = [m for m in r.smembers(s) if ns in m]
                if members:
                    r.srem(s, *members)
        finally:
            r.close()
