"""Schedules for periodic tasks: a fixed interval or a five-field cron expression.

Cron fields are minute (0-59), hour (0-23), day of month (1-31), month
(1-12) and day of week (0-6, Sunday is 0 or 7), each ``*``, a number, a
range ``a-b``, a step ``*/n`` or ``a-b/n``, or a comma list of these.  As in
cron, when both day fields are restricted a day matching either one runs.
Times are UTC.
"""
from __future__ import annotations

import calendar
from datetime import datetime, timedelta, timezone
from typing import FrozenSet, Tuple

from . import errors

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


def _field(text: str, what: str, lo: int, hi: int) -> FrozenSet[int]:
    out = set()
    for part in text.split(","):
        rng, _, step_s = part.partition("/")
        try:
            step = int(step_s) if step_s else 1
            if rng == "*":
                a, b = lo, hi
            elif "-" in rng:
                a_s, b_s = rng.split("-", 1)
                a, b = int(a_s), int(b_s)
            else:
                a = b = int(rng)
                if step_s:
                    b = hi
        except ValueError:
            raise errors.InvalidArgument(f"cron {what} field {text!r} is not a number, range, step or list") from None
        if step < 1 or not lo <= a <= b <= hi:
            raise errors.InvalidArgument(f"cron {what} field {text!r} is out of range {lo}-{hi}")
        out.update(range(a, b + 1, step))
    return frozenset(out)


class Cron:
    """A parsed cron expression; :meth:`next_after` gives its next time."""

    def __init__(self, expr: str) -> None:
        if not isinstance(expr, str):
            raise errors.InvalidArgument(f"a cron expression must be a str, got {expr!r}")
        parts = expr.split()
        if len(parts) != 5:
            raise errors.InvalidArgument(f"a cron expression has 5 fields (minute hour day month weekday), "
                                         f"got {expr!r}")
        self.expr = expr
        sets = [_field(p, *f) for p, f in zip(parts, _FIELDS)]
        self.minutes, self.hours, self.days, self.months, dow = sets
        self.weekdays = frozenset(d % 7 for d in dow)
        self.any_day = parts[2] == "*"
        self.any_weekday = parts[4] == "*"

    def _day_ok(self, y: int, m: int, d: int) -> bool:
        weekday = (calendar.weekday(y, m, d) + 1) % 7  # cron: Sunday is 0
        if self.any_day or self.any_weekday:
            return d in self.days and weekday in self.weekdays
        return d in self.days or weekday in self.weekdays

    def next_after(self, t: float) -> float:
        """The first matching minute strictly after `t` (epoch seconds, UTC)."""
        at = datetime.fromtimestamp(int(t) // 60 * 60 + 60, tz=timezone.utc)
        end = at + timedelta(days=366 * 5)  # five years bounds any valid expression
        while at < end:
            if at.month not in self.months:  # to the first of the next month
                at = (at.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            elif not self._day_ok(at.year, at.month, at.day):
                at = at.replace(hour=0, minute=0) + timedelta(days=1)
            elif at.hour not in self.hours:
                at = at.replace(minute=0) + timedelta(hours=1)
            elif at.minute not in self.minutes:
                at += timedelta(minutes=1)
            else:
                return at.timestamp()
        raise errors.InvalidArgument(f"cron expression {self.expr!r} never matches")


def next_tick(every_us: int, cron: str, last_us: int, now_us: int) -> int:
    """When a schedule fires next after `now_us`, its last tick having been
    `last_us`: one tick per interval; missed ticks collapse into the next."""
    if cron:
        return int(Cron(cron).next_after(now_us / 1e6) * 1e6)
    if last_us <= 0:
        return now_us + every_us
    missed = max(0, (now_us - last_us) // every_us)
    return last_us + (missed + 1) * every_us


def parse(every: object, cron: object) -> Tuple[int, str]:
    """(interval in us, cron expression) from the user's `every` (seconds or
    a timedelta) or `cron`; exactly one of them."""
    if (every is None) == (cron is None):
        raise errors.InvalidArgument("a periodic task needs every= or cron=, not both")
    if cron is not None:
        Cron(cron).next_after(0)  # raises on a bad expression, or one that never matches
        return 0, str(cron)
    seconds = every.total_seconds() if hasattr(every, "total_seconds") else every  # type: ignore[union-attr]
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0.01 <= seconds <= 10**8:
        raise errors.InvalidArgument(f"every must be a timedelta or seconds in 0.01..1e8, got {every!r}")
    return int(seconds * 1e6), ""
