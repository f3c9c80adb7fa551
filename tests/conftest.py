from __future__ import annotations

import itertools
import os
from typing import Iterator

import pytest

from engine.shm import Segment

_n = itertools.count()


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



@pytest.fixture
def db(tmp_path) -> Iterator[str]:
    """A database path; its writer is stopped and its segment removed after the test."""
    import signal
    import time

    from engine import paths

    path = str(tmp_path / "q.db")
    yield path
    try:
        with open(path + ".lock") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and paths.writer_alive(path):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while paths.writer_alive(path) and time.monotonic() < deadline:
            time.sleep(0.02)
    if os.path.exists(path):
        Segment.unlink(paths.segment_name(path))
