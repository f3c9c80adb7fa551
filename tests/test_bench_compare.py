"""benches/compare_runs.py: the table the benchmark workflow posts."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "compare_runs.py"


def _run(tmp_path, base, head):
    paths = []
    for name, data in (("base.json", base), ("head.json", head)):
        p = tmp_path / name
        if data is not None:
            p.write_text(json.dumps(data))
        paths.append(str(p))
    r = subprocess.run([sys.executable, str(SCRIPT)] + paths, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _bench(name, median, rate=None):
    return {"fullname": f"benches/test_engine.py::{name}", "stats": {"median": median},
            "extra_info": {"items_per_s": rate} if rate else {}}


def test_table_gives_each_case_its_speed_ratio(tmp_path):
    base = {"benchmarks": [_bench("test_a", 0.010, 100_000), _bench("test_gone", 1.5)]}
    head = {"benchmarks": [_bench("test_a", 0.005, 200_000), _bench("test_new", 0.002)]}
    out = _run(tmp_path, base, head)
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| `")}
    assert "2.00×" in lines["`test_a`"] and "100.0k/s" in lines["`test_a`"] and "200.0k/s" in lines["`test_a`"]
    assert "1.50 s" in lines["`test_gone`"] and lines["`test_gone`"].rstrip().endswith("| – |")
    assert "2.00 ms" in lines["`test_new`"]


def test_a_missing_base_gives_head_only(tmp_path):
    out = _run(tmp_path, None, {"benchmarks": [_bench("test_a", 0.010)]})
    assert "no base figures" in out and "`test_a`" in out
