"""Tuning knobs: module constants with `#:` docs, each overridable from the
environment as ``HEADRACE_<NAME>`` and per queue as ``Queue(path, name=value)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Dict

from . import errors


def _env(name: str, default: Any) -> Any:
    raw = os.environ.get("HEADRACE_" + name.upper())
    if raw is None:
        return default
    try:
        return type(default)(raw)
    except ValueError:
        raise errors.InvalidArgument(f"HEADRACE_{name.upper()}={raw!r} is not a {type(default).__name__}") from None


@dataclass(frozen=True)
class Settings:
    """Per-queue settings; defaults come from the environment, then these values."""

    #: Live-task slots in shared memory.  A larger backlog spills to SQLite.
    capacity: int = 65536
    #: Bytes of the shared-memory request area that carries submits to the writer.
    request_bytes: int = 32 << 20
    #: Jobs per transaction when submitting (a batch is split into chunks this big).
    chunk: int = 10000
    #: Most outcome rows the writer writes in one transaction.
    flush_rows: int = 20000
    #: Longest a reported outcome waits before the writer writes it (seconds).
    flush_interval: float = 0.02
    #: How long a claim holds a task before it goes back to pending (seconds).
    #: Workers renew the lease of the task they run, so this is the time it
    #: takes to notice a dead worker, not a limit on task length.
    lease: float = 30.0
    #: Seconds between upkeep passes (lease expiry, delayed tasks, refills).
    upkeep_interval: float = 0.05
    #: Refill the segment from the spill table once this fraction of slots is free.
    refill_free: float = 0.25
    #: Seconds between PASSIVE WAL checkpoints.
    checkpoint_interval: float = 1.0
    #: Also a PASSIVE checkpoint once the WAL holds this many pages (one-by-one
    #: submits write ~3 a commit, so the timer alone let it reach ~200 MB).
    checkpoint_pages: int = 8192
    #: WAL size (bytes) above which the writer runs a TRUNCATE checkpoint.
    wal_truncate_bytes: int = 256 << 20
    #: How long the writer lingers with no client before it exits (seconds).
    idle_exit: float = 1.0
    #: Largest serialised payload accepted (bytes).
    max_payload: int = 4 << 20
    #: Seconds a draining worker lets its running task finish before it is killed.
    grace: float = 30.0
    #: Most jobs a worker claims at once.
    claim_batch: int = 32
    #: While tasks arrive as a stream, a worker claims at most once per this
    #: many seconds, so that it claims them in batches; a task that comes to
    #: an idle worker is claimed at once.  0: claim each as it comes.
    claim_linger: float = 0.001
    #: Longest the C turn holds a one-by-one submit's event before it writes
    #: it, with the others held (seconds; 0: each in its own submit's
    #: commit).  A commit that writes no event writes a third fewer pages.
    #: Events a crash loses are written again at the next start.
    event_delay: float = 0.005
    #: 1: the writer commits turns of plain submits in C (csrc/turn.h); 0:
    #: every turn in Python (to compare, or to rule the C turn out).
    native_turn: int = 1
    #: Microseconds the writer spins for more requests before it sleeps.
    writer_spin_us: int = 200
    #: Microseconds a producer or worker spins for its wake-up before it sleeps
    #: (a futex sleep and wake costs 30-80 us on a VM; a commit takes ~20-50 us).
    wait_spin_us: int = 100
    #: Seconds a finished (completed, dead or cancelled) task is kept before
    #: the writer purges it; 0 keeps finished tasks for ever.
    retention: float = 7 * 86400.0
    #: Most finished tasks kept, the oldest purged first; 0: no limit.
    retention_count: int = 0
    #: Tasks one purge transaction looks at (purging runs between turns, so
    #: a small batch keeps submits and flushes flowing).
    purge_batch: int = 2000
    #: Seconds between purge passes.
    purge_interval: float = 0.5

    def check(self) -> "Settings":
        """Validate every value; raises InvalidArgument naming the bad one."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise errors.InvalidArgument(f"setting {f.name} must be a non-negative number, got {v!r}")
        if self.capacity < 1:
            raise errors.InvalidArgument(f"capacity must be at least 1, got {self.capacity!r}")
        if self.chunk < 1 or self.flush_rows < 1 or self.claim_batch < 1:
            raise errors.InvalidArgument("chunk, flush_rows and claim_batch must be at least 1")
        rb = self.request_bytes
        if rb < 4096 or rb & (rb - 1) or rb > 1 << 30:
            raise errors.InvalidArgument(f"request_bytes must be a power of two in 4096..2**30, got {rb!r}")
        if self.native_turn not in (0, 1):
            raise errors.InvalidArgument(f"native_turn must be 0 or 1, got {self.native_turn!r}")
        if not 0 < self.refill_free <= 1:
            raise errors.InvalidArgument(f"refill_free must be in (0, 1], got {self.refill_free!r}")
        return self

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def settings(**overrides: Any) -> Settings:
    """Settings from the environment, then `overrides`; raises on unknown names."""
    base = Settings()
    env = {f.name: _env(f.name, getattr(base, f.name)) for f in fields(base)}
    known = set(env)
    bad = [k for k in overrides if k not in known]
    if bad:
        raise errors.InvalidArgument(
            f"unknown setting(s) {', '.join(map(repr, bad))}; known: {', '.join(sorted(known))}")
    for k, v in overrides.items():
        default = env[k]
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        env[k] = v
    return replace(base, **env).check()
