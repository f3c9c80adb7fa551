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
