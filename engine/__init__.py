"""headrace: a durable task queue engine with its hot path in shared memory."""
from __future__ import annotations

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .api import Backoff, BatchOutcome, Event, Job, Outcome, Queue, Task, TaskInfo  # noqa: E402
from .errors import EngineError, Retry  # noqa: E402
from .shm import Segment  # noqa: E402
from .workers import current_job  # noqa: E402

__all__ = ["Backoff", "BatchOutcome", "EngineError", "Event", "Job", "Outcome", "Queue", "Retry", "Segment", "Task",
           "TaskInfo", "current_job", "errors", "__version__"]
