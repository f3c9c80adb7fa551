"""benches/compare.py without servers: the server-based peers (rq, huey-redis,
dramatiq, procrastinate) are reported as skipped, with the reason, and the
run goes on.  Nothing here needs Redis or PostgreSQL: both are pointed at a
loopback port where nothing listens."""
from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHES = ROOT / "benches"
SERVER_PEERS = ("rq", "huey-redis", "dramatiq", "procrastinate")


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_servers(monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("HEADRACE_COMPARE_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("HEADRACE_COMPARE_PG_DSN", f"postgresql://postgres@127.0.0.1:{port}/postgres")
    return port


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHES))
    import peers
    return peers


def test_server_peers_report_a_skip_reason_each(no_servers, peers):
    status = dict(peers.server_peers())
    assert sorted(status) == sorted(SERVER_PEERS)
    for name in ("rq", "huey-redis", "dramatiq"):
        assert status[name].startswith("skipped: "), status[name]
        assert f"no Redis on 127.0.0.1:{no_servers}" in status[name]
        assert "HEADRACE_COMPARE_REDIS_URL" in status[name]
    assert status["procrastinate"].startswith("skipped: ")
    assert f"no PostgreSQL on 127.0.0.1:{no_servers}" in status["procrastinate"]
    assert "HEADRACE_COMPARE_PG_DSN" in status["procrastinate"]


def test_a_missing_client_library_is_named_with_the_install_hint(no_servers, peers, monkeypatch):
    rq = peers.ADAPTERS["rq"]
    monkeypatch.setattr(rq, "modules", ("headrace_no_such_module", "redis"))
    why = dict(peers.server_peers())["rq"]
    assert why.startswith("skipped: ") and "headrace_no_such_module" in why
    assert "not installed (pip install '.[compare]')" in why


def test_server_addresses_come_from_the_environment(peers, monkeypatch):
    from peers import servers
    monkeypatch.delenv("HEADRACE_COMPARE_REDIS_URL", raising=False)
    monkeypatch.delenv("HEADRACE_COMPARE_PG_DSN", raising=False)
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    assert servers.redis_address(servers.redis_url()) == ("127.0.0.1", 6379)
    assert servers.pg_address(servers.pg_dsn()) == ("127.0.0.1", 5432)
    assert servers.redis_address("unix:///run/redis.sock") == ("/run/redis.sock", None)
    assert servers.pg_address("host=db.local port=6543 dbname=x") == ("db.local", 6543)
    assert servers.pg_address("dbname=x host=/run/pg") == ("/run/pg/.s.PGSQL.5432", None)
    # A figure's namespace is a valid Redis prefix, huey name and PostgreSQL identifier.
    ns = servers.namespace("/tmp/compare-rq-drain_2w-abc")
    assert ns == servers.namespace("/tmp/compare-rq-drain_2w-abc") and ns.startswith("hrbench_")
    assert ns.replace("_", "").isalnum() and ns.islower() and len(ns) < 63


def test_compare_quick_lists_them_as_skipped(no_servers, tmp_path):
    out = tmp_path / "r.json"
    # The smallest --quick run (one figure), with a server peer asked for by name.
    r = subprocess.run([sys.executable, str(BENCHES / "compare.py"), "--quick", "--systems", "apsw-floor,rq",
                        "--workloads", "batch_submit", "--json", str(out), "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    header = r.stdout.split("## Results")[0].splitlines()
    for name in SERVER_PEERS:
        (line,) = [x for x in header if x.startswith(f"- {name}: ")]
        assert "skipped: no " in line, line
    assert "| batch_submit | apsw-floor |" in r.stdout
    data = json.loads(out.read_text())
    assert "rq" in data["skipped"] and set(data["servers"]) == set(SERVER_PEERS)
    assert [row["system"] for row in data["results"]] == ["apsw-floor"]
