from __future__ import annotations

import itertools
import os
import tempfile
from typing import Iterator

import pytest

from engine import faults
from engine.shm import Segment

_n = itertools.count()
#: Python-level fault sites that fired in this run, from every process (engine/faults.py).
_FAULT_LOG = os.path.join(tempfile.gettempdir(), f"headrace-faults-{os.getpid()}.log")


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.path.exists(_FAULT_LOG):
        os.remove(_FAULT_LOG)
    os.environ["HEADRACE_FAULT_LOG"] = _FAULT_LOG


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """As apsw does: a green run of the whole suite fails if an injection
    site was never reached (its crash test would prove nothing)."""
    opt = session.config.option
    whole = not opt.keyword and not opt.markexpr and all(
        os.path.abspath(a) == os.path.dirname(__file__) for a in session.config.args)
    if exitstatus != 0 or not whole:
        return
    fired = set(open(_FAULT_LOG).read().split()) if os.path.exists(_FAULT_LOG) else set()
    missing = sorted(set(faults.PY_SITES) - fired)
    if missing:
        print(f"\nFAILED: fault injection sites never reached by the suite: {', '.join(missing)}")
        session.exitstatus = 1


@pytest.fixture
def segname() -> Iterator[str]:
    """A fresh segment name, unlinked after the test."""
    name = f"test-{os.getpid()}-{next(_n)}"
    yield name
    Segment.unlink(name)


@pytest.fixture
def seg(segname: str) -> Iterator[Segment]:
    s = Segment.create(segname, 64)
    yield s
    s.close()



def _stop_writer_and_unlink(path: str) -> None:
    """Stop the writer of the database at `path` and remove its segment: a
    segment a killed (or in-process) writer left would outlive the test's
    directory, and each holds its capacity's memory in /dev/shm until reboot."""
    import signal
    import time

    from engine import paths

    try:
        with open(path + ".lock") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and paths.writer_alive(path):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while paths.writer_alive(path) and time.monotonic() < deadline:
            time.sleep(0.02)
    if os.path.exists(path):
        try:
            Segment.unlink(paths.segment_name(path))
        except Exception:  # not a database of ours (a test's foreign file, say)
            pass


@pytest.fixture(autouse=True)
def _no_segment_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used a temporary directory: every database in it
    has its writer stopped and its segment removed."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if tmp is not None:
        for path in tmp.rglob("*.db"):
            _stop_writer_and_unlink(str(path))


@pytest.fixture
def db(tmp_path) -> str:
    """A database path; its writer is stopped and its segment removed after
    the test (by _no_segment_left, as for any database in tmp_path)."""
    return str(tmp_path / "q.db")
