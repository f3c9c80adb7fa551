"""headrace: a durable task queue engine with its hot path in shared memory."""
from __future__ import annotations

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .errors import EngineError  # noqa: E402
from .shm import Segment  # noqa: E402

__all__ = ["EngineError", "Segment", "errors", "__version__"]
