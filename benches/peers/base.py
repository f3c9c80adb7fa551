"""What every system adapter shares: the payload, the completion recorder and
the adapter interface that ``benches/compare.py`` drives.

An adapter wraps one queue library behind the same small interface:

- producer side (in the process that submits): :meth:`Adapter.open`,
  :meth:`Adapter.submit`, :meth:`Adapter.submit_batch`, :meth:`Adapter.stored`,
  :meth:`Adapter.effective`, :meth:`Adapter.close`;
- worker side (in a ``--role workers`` process of its own):
  :meth:`Adapter.serve`, which runs until SIGTERM.

Workers of every system record completions the same way: the task appends
one line per run to a per-process file opened with ``O_APPEND``
(:class:`Recorder`), and the harness reads the files afterwards.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional

#: The task name every system registers.
TASK_NAME = "bench.noop"
#: The payload's filler: with the index and the enqueue time the JSON
#: encoding is ~110 bytes.
FILLER = "abcdefghij" * 8
#: SQLite busy timeout (seconds) given to every peer, instead of their
#: defaults of 5-10 s, so that lock waits under 4 producers + 2 workers do not
#: turn into errors.
BUSY_TIMEOUT = 30.0


def payload(i: int, t: float) -> Dict[str, Any]:
    """Task `i`'s argument; `t` is its enqueue time (time.time())."""
    return {"i": i, "t": t, "s": FILLER}


def version_of(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


class Recorder:
    """Appends ``index enqueue_time done_time`` per completed task to
    ``<dir>/<pid>.rec``; opened lazily so that forked workers get their own file."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.pid = -1
        self.fd = -1
        self.inherited = False

    def open_for_forks(self) -> None:
        """Open this process's file now and keep it in forked children: for
        workers that fork a child per task (RQ's work horse), which would
        otherwise leave one file per task.  Each line is one write() to an
        O_APPEND file, so the children's lines do not interleave."""
        self.pid = os.getpid()
        self.fd = os.open(os.path.join(self.dir, f"{self.pid}.rec"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.inherited = True

    def record(self, p: Dict[str, Any]) -> None:
        now = time.time()
        pid = os.getpid()
        if self.pid != pid and not self.inherited:
            # fd before pid: a thread that sees the new pid finds the file open
            # (workers that run tasks in threads, as dramatiq's do, race here
            # on their first tasks; two threads may both open it, which is harmless).
            self.fd = os.open(os.path.join(self.dir, f"{pid}.rec"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.pid = pid
        os.write(self.fd, b"%d %.6f %.6f\n" % (p["i"], p["t"], now))


class StopFlag:
    """Set by SIGTERM/SIGINT: the handler only sets the flag."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGTERM, self._on)
        signal.signal(signal.SIGINT, self._on)

    def _on(self, signum: int, frame: Any) -> None:
        self.set = True

    def sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, in short steps so that a stop is seen soon
        (time.sleep resumes after a signal handler returns)."""
        end = time.monotonic() + seconds
        while not self.set:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))


class Adapter:
    """One queue system under test.  Subclasses set the class attributes and
    implement the methods; `path` is a directory of the figure's own."""

    #: Name on the command line and in the table.
    name = ""
    #: Distribution whose version is reported.
    dist = ""
    #: How WAL + synchronous=NORMAL (or, for a server, its closest match) was
    #: put in place (printed).
    durability = ""
    #: The batch API used by batch_submit, or None if submits are one by one in a loop.
    batch_api: Optional[str] = None
    #: How tasks are run (printed).
    worker_model: Optional[str] = None
    #: `--role workers` processes to start (each runs :meth:`serve`); 0: the
    #: system has no consumer and runs the submit workloads only.
    worker_processes = 1
    #: Delivery semantics, as the library implements them (printed).
    semantics = ""

    def __init__(self, path: str, poll: float = 0.01) -> None:
        self.path = path
        self.poll = poll

    @classmethod
    def version(cls) -> str:
        return version_of(cls.dist)

    #: Module that must import for the system to run here ("" = always available).
    module = ""

    @classmethod
    def available(cls) -> Optional[str]:
        """None if usable here, else why not."""
        if not cls.module:
            return None
        try:
            importlib.import_module(cls.module)
        except ImportError:
            return f"{cls.dist} is not installed (pip install '.[compare]')"
        return None

    # ---- producer side ----
    def open(self) -> None:
        raise NotImplementedError

    def submit(self, p: Dict[str, Any]) -> None:
        raise NotImplementedError

    def submit_batch(self, ps: List[Dict[str, Any]]) -> None:
        for p in ps:
            self.submit(p)

    def stored(self) -> int:
        """Tasks stored and waiting (the delivery check of submit-only workloads)."""
        raise NotImplementedError

    def effective(self) -> Dict[str, Any]:
        """The durability settings as read back from a live connection
        (SQLite: journal_mode and synchronous); printed as key=value."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # ---- worker side ----
    def serve(self, rec: Recorder, ready: Callable[[], None], go: Callable[[], None]) -> None:
        """Open, call `ready()`, wait in `go()`, then run tasks until SIGTERM."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """After the figure's processes are gone (headrace waits for its writer)."""


SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def read_pragmas(execute: Callable[[str], Any]) -> Dict[str, Any]:
    """journal_mode and synchronous through a connection's execute()."""
    jm = execute("PRAGMA journal_mode").fetchone()[0]
    sync = execute("PRAGMA synchronous").fetchone()[0]
    return {"journal_mode": str(jm).lower(), "synchronous": SYNC_NAMES.get(sync, sync)}


def dumps(p: Dict[str, Any]) -> str:
    return json.dumps(p, separators=(",", ":"))
