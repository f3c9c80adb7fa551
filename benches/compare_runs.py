"""Compare two pytest-benchmark JSON files (base, head) case by case.

    python benches/compare_runs.py base.json head.json

Prints a markdown table: each case's median round on both sides, its rate
(items/s, where the case records it) and head ÷ base speed.  A case on only
one side is listed with a dash on the other.  A missing or unreadable base
file (a base commit without these benchmarks) gives a table of head only.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional


def load(path: str) -> Dict[str, Dict[str, Any]]:
    """name -> {"median": seconds, "rate": items/s or None}."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {}
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info") or {}
        out[b["fullname"].split("::")[-1]] = {"median": b["stats"]["median"], "rate": extra.get("items_per_s")}
    return out


def _time(s: Optional[float]) -> str:
    if s is None:
        return "–"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _rate(r: Optional[float]) -> str:
    if r is None:
        return "–"
    return f"{r / 1e3:.1f}k/s" if r >= 1000 else f"{r:.0f}/s"


def table(base: Dict[str, Dict[str, Any]], head: Dict[str, Dict[str, Any]]) -> str:
    rows: List[str] = ["| case | base median | head median | base rate | head rate | head ÷ base speed |",
                       "|---|---|---|---|---|---|"]
    for name in sorted(set(base) | set(head)):
        b, h = base.get(name, {}), head.get(name, {})
        bm, hm = b.get("median"), h.get("median")
        ratio = f"{bm / hm:.2f}×" if bm and hm else "–"
        rows.append(f"| `{name}` | {_time(bm)} | {_time(hm)} | {_rate(b.get('rate'))} | {_rate(h.get('rate'))} "
                    f"| {ratio} |")
    note = "" if base else "\n(no base figures: the base commit has no such benchmarks, or they failed)\n"
    return "\n".join(rows) + "\n" + note


def main(argv: List[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(load(argv[1]), load(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
