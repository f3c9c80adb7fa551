"""benches/probe.py: the quick probes and the A/B runner the README's
before/after figures come from."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from helpers import CHILD_CWD, child_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benches" / "probe.py")


def _run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          cwd=CHILD_CWD, env=child_env(env))


def test_each_probe_measures_its_path():
    for args, keys in ((("single", "300"), {"tasks_s", "wal_max_mb", "producer_cpu_us", "p999_ms", "max_ms",
                                             "writer_cpu_us"}),
                       (("single", "400", "--producers", "2"), {"tasks_s", "wal_max_mb", "writer_cpu_us"}),
                       (("batch", "2000"), {"tasks_s", "producer_cpu_us", "writer_cpu_us"}),
                       (("drain", "2000"), {"tasks_s", "workers_cpu_us", "writer_cpu_us"}),
                       (("e2e", "300"), {"tasks_s", "p50_ms", "p99_ms", "workers_cpu_us", "writer_cpu_us", "submit_p50_us",
                                          "submit_p99_us", "submit_mean_us"}),
                       (("claim", "640"), {"pop_us", "tickets_us", "sql_us", "decode_us", "finish_us", "claim_us",
                                           "run_us"})):
        r = _run(*args, "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert set(res) == keys, args
        assert all(v > 0 for v in res.values()) if args[0] == "claim" else res["tasks_s"] > 0, (args, res)
        assert all(v >= 0 for v in res.values()), (args, res)


def test_ab_alternates_two_checkouts_and_prints_medians():
    import engine
    tree = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    r = _run("ab", tree, tree, "--runs", "2", "--", "single", "200")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["run 1 old", "run 1 new", "run 2 old", "run 2 new",
                                                   "median old", "median new"]
