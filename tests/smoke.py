"""A smoke test of an installed headrace: run as ``python tests/smoke.py``.

It needs nothing but the package (wheel checks, cibuildwheel): it opens a
queue in a temporary directory, submits single and batch tasks, runs them
through a worker process, and checks results, a retry to dead, the CLI and
the segment's invariants.  Exit status 0 means it all held.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def main() -> int:
    import engine
    from engine import errors

    with tempfile.TemporaryDirectory(prefix="headrace-smoke-") as d:
        path = os.path.join(d, "smoke.db")
        with engine.Queue(path) as q:
            @q.task(name="smoke.square")
            def square(i: int) -> int:
                return i * i

            @q.task(name="smoke.fail", max_attempts=2)
            def fail() -> None:
                raise ValueError("smoke")

            one = square.submit(7)
            batch = q.submit_batch([square.job(i) for i in range(500)])
            assert len(batch.inserted) == 500, batch
            bad = fail.submit()
            done = 0
            deadline = time.monotonic() + 60
            while done < 503 and time.monotonic() < deadline:
                for job in q.claim(max=64, timeout=1.0):
                    try:
                        job.complete(q.tasks[job.name].fn(*job.args, **job.kwargs))
                    except ValueError as e:
                        job.fail(e)
                    done += 1
            assert q.result(one, timeout=30) == 49
            assert q.result(batch.inserted[-1], timeout=30) == 499 * 499
            try:
                q.result(bad, timeout=30)
                raise AssertionError("the failing task did not end dead")
            except errors.TaskFailed as e:
                assert e.state == "dead" and e.error["message"] == "smoke"
            q.verify()
        out = subprocess.run([sys.executable, "-m", "engine", "stats", path], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "completed" in out.stdout, out.stdout + out.stderr
        # The writer's turn for plain submits runs in C (built with SQLite's extension header).
        store = engine.store.SQLiteStore(os.path.join(d, "native.db"))
        try:
            assert store.native_turn() is not None, "this build has no C turn for the writer"
        finally:
            store.close()
    print(f"headrace {engine.__version__} smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
