"""The chaos harness, short: kill -9 at random for a while, then check that
nothing acknowledged was lost (engine/chaos.py says what it checks).  The
long run is `headrace chaos --minutes N`."""
from __future__ import annotations

import os

from engine import chaos

#: Seconds of killing; with the drain and the checks the test takes about a minute.
SECONDS = float(os.environ.get("HEADRACE_CHAOS_SECONDS", "30"))


def test_random_kills_lose_nothing(tmp_path):
    lines = []
    report = chaos.run(SECONDS, workers=2, seed=int(os.environ.get("HEADRACE_CHAOS_SEED", "7")),
                       directory=str(tmp_path / "run"), log=lines.append)
    print("\n".join(lines + [report.summary()]))
    assert report.ok, report.summary()
    assert all(report.kills[k] >= 1 for k in chaos.KINDS), report.kills
    assert report.acked > 1000 and report.stored >= report.acked
    assert report.live_checked == 0  # drained: nothing live is left, and verify found nothing amiss
