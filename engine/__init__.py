"""headrace: a durable task queue engine with its hot path in shared memory."""
from __future__ import annotations

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .api import BatchOutcome, Job, Outcome, Queue, Task, TaskInfo  # noqa: E402
from .errors import EngineError  # noqa: E402
from .shm import Segment  # noqa: E402

__all__ = ["BatchOutcome", "EngineError", "Job", "Outcome", "Queue", "Segment", "Task", "TaskInfo", "errors",
           "__version__"]
