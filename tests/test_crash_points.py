"""Targeted crash points reached through the Python-level fault sites
(engine/faults.py): a producer killed in the middle of submit_batch leaves
each chunk wholly in or wholly out."""
from __future__ import annotations

import subprocess
import sys

import pytest

import engine
from engine_helpers import wait_for
from helpers import CHILD_CWD, child_env

PRODUCER = r'''
import sys, engine
q = engine.Queue(sys.argv[1], chunk=1000)
q.submit_batch([engine.Job("t", args=(i,)) for i in range(2500)])
print("returned")
'''


@pytest.mark.parametrize("site,stored", [("chunk_write", 1000), ("chunk_sent", 2000)])
def test_producer_killed_mid_batch_leaves_whole_chunks(db, site, stored):
    """Killed while writing its second chunk, the producer leaves the first
    chunk stored and nothing of the second (the writer skips the record of a
    dead producer); killed right after publishing it, both are stored whole."""
    env = child_env()
    env["HEADRACE_PRODUCER_FAULT"] = f"{site}:2"
    with engine.Queue(db) as q:  # our writer runs without the fault
        p = subprocess.run([sys.executable, "-c", PRODUCER, db], env=env, cwd=CHILD_CWD, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == -9 and "returned" not in p.stdout, p.stderr
        wait_for(lambda: q.stats()["counts"]["pending"] >= stored, what=f"{stored} tasks stored")
        after = q.submit("t", args=("after",))  # the request area moved on past the dead record
        args = sorted(a for (a,) in (engine.api.loads(ser, body)[0] for ser, body in q.reader.conn.execute(
            "SELECT t.ser, p.body FROM tasks t JOIN payloads p ON p.id = t.id WHERE t.id != ?", (after,))))
        assert args == list(range(stored)), "whole chunks, and only those"
        assert q.verify() == stored + 1
