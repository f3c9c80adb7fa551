"""Hypothesis fuzzing of the public submit API against one real queue per test.

Each generated submit either raises a typed error (an engine.errors
exception, naming the bad argument) or is stored and reads back equal (via
q.get, the stored record and a claim).  At the end of each test, every task
accepted during it is still there and claimable (or delayed, when its time
has not come), so no input leaves the engine broken.
"""
from __future__ import annotations

import datetime
import enum
import json
import math
import time
from decimal import Decimal
from typing import Any, Dict, List, Optional, Set

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine import errors
from engine.shm import key_bytes

#: A small payload limit, so that oversize payloads are cheap to make.
MAX_PAYLOAD = 4096
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


class Prio(enum.IntEnum):
    LOW = 1
    HIGH = 200


class Name(str):
    pass


class Junk:
    def __repr__(self) -> str:
        return "<Junk thing>"


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


# ---- strategies ------------------------------------------------------------------

#: Text of any code point, lone surrogates included (which SQLite cannot store as TEXT).
any_char = st.one_of(st.characters(codec=None), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                     st.sampled_from(["\x00", "\n", "'", '"', ";", "%", "\\"]))
any_text = st.text(any_char, max_size=40)
junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.binary(max_size=8),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                 st.builds(Junk), st.just(Decimal("1.5")), st.complex_numbers(max_magnitude=5),
                 st.just(float("nan")), st.just(float("inf")), st.sets(st.integers(), max_size=2))
names = st.one_of(any_text, st.text(min_size=500, max_size=530), st.just("os.system"), st.just("t"),
                  st.builds(Name, st.sampled_from(["t", "fuzz.task"])), junk)
priorities = st.one_of(st.integers(0, 255), st.integers(-2**64, 2**64), st.sampled_from(list(Prio)), junk)
attempts = st.one_of(st.none(), st.integers(1, 10), st.integers(-5, 2**40), junk)
#: Delays either clearly short (the task runs at once) or clearly long, or out of range.
delays = st.one_of(st.none(), st.just(0), st.floats(0, 0.05), st.floats(3600, 1e9), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=True, allow_infinity=True), junk)
run_ats = st.one_of(st.none(), st.floats(0, 1e9),  # the past: runs now
                    st.floats(1e10, 2e10), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
                    st.datetimes(min_value=datetime.datetime(2000, 1, 1)),
                    st.datetimes(timezones=st.builds(datetime.timezone,
                                                     st.integers(-12 * 60, 12 * 60).map(
                                                         lambda m: datetime.timedelta(minutes=m)))),
                    st.just(datetime.datetime.min), st.just(datetime.datetime.max), junk)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(),  # NaN and inf too
                      st.text(any_char, max_size=30))
json_values = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.tuples(kids, kids),
    st.dictionaries(st.text(any_char, max_size=8), kids, max_size=4)), max_leaves=12)


def _nested(depth: int) -> Any:
    v: Any = []
    for _ in range(depth):
        v = [v]
    return v


def _cyclic() -> Any:
    v: List[Any] = [1]
    v.append(v)
    return v


bad_values = st.one_of(st.builds(Junk), st.sets(st.integers(), min_size=1, max_size=2), st.binary(max_size=4),
                       st.complex_numbers(max_magnitude=1), st.integers(5000, 50_000).map(_nested),
                       st.builds(_cyclic), st.just(10 ** 5000))
payload_values = st.one_of(json_values, json_values, bad_values,
                           st.integers(1000, 6000).map(lambda n: "x" * n),  # around the payload limit
                           st.integers(1, 40).map(_nested))
args_s = st.one_of(st.lists(payload_values, max_size=3), st.lists(payload_values, max_size=3).map(tuple), junk)
kwargs_s = st.one_of(st.none(), st.dictionaries(st.text(any_char, max_size=8), payload_values, max_size=3),
                     st.dictionaries(st.one_of(st.integers(), st.text(max_size=2)), st.integers(), min_size=1,
                                     max_size=2),
                     junk)
dedup_keys = st.one_of(st.none(), st.just(""), st.just(b""), any_text, st.binary(max_size=64),
                       st.integers(10_000, 200_000).map(lambda n: "k" * n), st.sampled_from(["a", b"a", "b"]),
                       st.builds(bytearray, st.binary(max_size=4)), junk)
groups = st.one_of(st.none(), any_text, st.sampled_from(["g1", "g2", "s3-east"]), st.text(min_size=510, max_size=520),
                   junk)
tag_text = st.one_of(st.text(any_char, min_size=1, max_size=12), st.just(""), st.text(min_size=250, max_size=260))
hashable_junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.binary(max_size=4),
                          st.builds(Junk), st.just(Decimal("2")), st.tuples(st.integers()))
tags_s = st.one_of(st.none(),
                   st.dictionaries(st.one_of(tag_text, hashable_junk), st.one_of(tag_text, junk), max_size=4),
                   st.dictionaries(st.text(min_size=1, max_size=6), st.just("v"), min_size=30, max_size=36),
                   st.lists(st.tuples(st.text(min_size=1), st.text(min_size=1)), max_size=2), junk)


# ---- the oracle: what API.md says is valid -------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _text_ok(x: Any, longest: int) -> bool:
    if not isinstance(x, str) or not 0 < len(x) <= longest:
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _payload_size(args: Any, kwargs: Any) -> Optional[int]:
    """Bytes of the JSON payload, or None if it cannot be JSON."""
    try:
        return len(json.dumps([list(args), dict(kwargs)], separators=(",", ":")).encode())
    except (TypeError, ValueError, RecursionError):
        return None


def _when(delay: Any, run_at: Any) -> Optional[float]:
    """Epoch seconds the task may first run (0: now), or None if invalid."""
    if delay is not None and run_at is not None:
        return None
    if delay is not None:
        return (time.time() + delay if delay > 0 else 0.0) if _is_num(delay) and 0 <= delay <= 1e9 else None
    if run_at is None:
        return 0.0
    if isinstance(run_at, datetime.datetime):
        try:
            run_at = run_at.timestamp()
        except (ValueError, OverflowError, OSError):
            return None
    if not _is_num(run_at) or not 0 <= run_at < 2**62 / 1e6:
        return None
    return run_at if run_at > time.time() else 0.0


def problems(f: Dict[str, Any]) -> Set[str]:
    """The keywords an error message may name for the invalid fields of submit `f` (empty: valid)."""
    bad: Set[str] = set()
    if not _text_ok(f["name"], 512):
        bad.add("name")
    if not _is_int(f["priority"]) or not 0 <= f["priority"] <= 255:
        bad.add("priority")
    if f["max_attempts"] is not None and (not _is_int(f["max_attempts"]) or not 1 <= f["max_attempts"] <= 10**6):
        bad.add("max_attempts")
    if _when(f["delay"], f["run_at"]) is None:
        bad |= {"delay", "run_at"}
    args, kwargs = f["args"], f["kwargs"] if f["kwargs"] is not None else {}
    if not isinstance(args, (tuple, list)):
        bad.add("args")
    elif not isinstance(kwargs, dict):
        bad.add("kwargs")
    elif not all(type(k) is str for k in kwargs):
        bad.add("kwargs")
    else:
        size = _payload_size(args, kwargs)
        if size is None:
            bad.add("serialise")
        elif size > MAX_PAYLOAD:
            bad.add("payload")
    if f["dedup_key"] is not None and not isinstance(f["dedup_key"], (str, bytes)):
        bad.add("dedup_key")
    if f["group"] is not None and not _text_ok(f["group"], 512):
        bad.add("group")
    tags = f["tags"]
    if tags is not None and (not isinstance(tags, dict) or len(tags) > 32
                             or not all(_text_ok(x, 256) for kv in tags.items() for x in kv)):
        bad.add("tag")
    return bad


# ---- checking what was stored ------------------------------------------------------------

def _canon(args: Any, kwargs: Any) -> str:
    """Arguments as JSON text: what the JSON serializer keeps (tuples become lists; NaN compares equal)."""
    return json.dumps([list(args), dict(kwargs or {})])


class Model:
    """The tasks a test had accepted, and what each must read back as."""

    def __init__(self, q: engine.Queue) -> None:
        self.q = q
        self.tasks: Dict[int, Dict[str, Any]] = {}
        self.live_keys: Dict[bytes, int] = {}

    def accepted(self, tid: int, f: Dict[str, Any]) -> None:
        assert isinstance(tid, int) and tid > 0
        name = str.__str__(f["name"])
        if f["dedup_key"] is not None:
            key = key_bytes(name, f["dedup_key"])
            if key in self.live_keys:  # on_duplicate="skip": the live task's id
                assert tid == self.live_keys[key], (tid, self.live_keys[key])
                return
            self.live_keys[key] = tid
        assert tid not in self.tasks, f"id {tid} handed out twice"
        self.tasks[tid] = exp = {"name": name, "prio": int(f["priority"]), "canon": _canon(f["args"], f["kwargs"]),
                                 "deps": list(dict.fromkeys(f.get("depends_on") or ())),
                                 "attempts": f["max_attempts"] or engine.Queue.DEFAULT_MAX_ATTEMPTS}
        info = self.q.get(tid)
        assert info is not None and info.id == tid
        assert info.name == name and info.priority == exp["prio"] and info.max_attempts == exp["attempts"]
        rec = self.q.reader.task(tid)
        assert rec["group"] == f["group"]
        assert rec["dedup"] == (key_bytes(name, f["dedup_key"]) if f["dedup_key"] is not None else None)
        for k, v in (f["tags"] or {}).items():
            assert tid in self.q.find({k: v}, limit=10**9)
        due = _when(f["delay"], f["run_at"])
        if exp["deps"]:
            assert info.state in ("waiting", "pending"), info
        elif info.state == "delayed":
            assert due and abs(info.run_at - due) < 5, (info.run_at, due)
        else:
            assert info.state == "pending" and due < time.time() + 0.5, (info, due)
        exp["due"] = info.run_at if info.state == "delayed" else 0.0

    def drain(self) -> None:
        """Claim every task that can run, check it reads back equal, complete
        it (which frees its dependents), until none is left; the rest must be
        delayed (or waiting on a delayed one)."""
        q, tasks = self.q, self.tasks
        start = time.time()
        runnable: Set[int] = set()
        changed = True
        while changed:  # a fixed point: due now, and every dependency runnable
            changed = False
            for tid, t in tasks.items():
                if tid not in runnable and t["due"] <= start and all(p in runnable for p in t["deps"]):
                    runnable.add(tid)
                    changed = True
        seen: Set[int] = set()
        deadline = time.monotonic() + 60
        while not runnable <= seen and time.monotonic() < deadline:
            for job in q.claim(max=1000, timeout=1.0):
                assert job.id in tasks, f"claimed {job.id}, which no test submit accepted"
                assert job.id not in seen, f"task {job.id} claimed twice"
                t = tasks[job.id]
                assert (job.name, _canon(job.args, job.kwargs), job.attempt) == (t["name"], t["canon"], 1)
                seen.add(job.id)
                ok = job.complete({"ok": job.id})
                assert ok, (q.seg.get(job.id), q.get(job.id), job.seg is q.seg, t)
        assert runnable <= seen, f"{len(runnable - seen)} accepted tasks never came out: {sorted(runnable - seen)[:10]}"
        for tid in set(tasks) - seen:  # not due yet (or waiting on one that is not)
            info = q.get(tid)
            assert info.state in ("delayed", "waiting") or info.state == "pending" and tasks[tid]["due"] < time.time()
        for tid in list(seen)[:50]:
            assert q.result(tid, timeout=30) == {"ok": tid}


def _fields(name: Any, args: Any, kwargs: Any, priority: Any, dedup_key: Any, max_attempts: Any, delay: Any,
            run_at: Any, group: Any, tags: Any, depends_on: Any = None) -> Dict[str, Any]:
    return dict(name=name, args=args, kwargs=kwargs, priority=priority, dedup_key=dedup_key,
                max_attempts=max_attempts, delay=delay, run_at=run_at, group=group, tags=tags, depends_on=depends_on)


def _check_error(e: BaseException, bad: Set[str], f: Dict[str, Any]) -> None:
    assert bad, f"a valid submit was refused: {type(e).__name__}: {e}\n{f!r:.2000}"
    assert isinstance(e, errors.EngineError), f"untyped error {type(e).__mro__}: {e}"
    assert isinstance(e, (errors.InvalidArgument, TypeError, ValueError)), type(e)
    msg = str(e)
    assert any(word in msg for word in bad), f"the error {msg!r} names none of {sorted(bad)}"


utf8_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
#: Valid values of each field ...
VALID = dict(
    name=st.one_of(utf8_text, st.sampled_from(["t", "os.system", "fuzz.task"]), st.builds(Name, utf8_text)),
    args=st.one_of(st.lists(json_values, max_size=3), st.lists(json_values, max_size=3).map(tuple)),
    kwargs=st.one_of(st.none(), st.dictionaries(st.text(any_char, max_size=8), json_values, max_size=3)),
    priority=st.one_of(st.integers(0, 255), st.sampled_from(list(Prio))),
    dedup_key=st.one_of(st.none(), st.none(), st.none(), dedup_keys.filter(lambda k: isinstance(k, (str, bytes)))),
    max_attempts=st.one_of(st.none(), st.integers(1, 10)),
    delay=st.one_of(st.none(), st.none(), st.floats(0, 0.05), st.floats(3600, 1e9)),
    run_at=st.none(),
    group=st.one_of(st.none(), st.none(), utf8_text, st.sampled_from(["g1", "g2"])),
    tags=st.one_of(st.none(), st.dictionaries(utf8_text, utf8_text, max_size=4)),
)
#: ... and values of every kind and range.
ANY = dict(name=names, args=args_s, kwargs=kwargs_s, priority=priorities, dedup_key=dedup_keys, max_attempts=attempts,
           delay=delays, run_at=run_ats, group=groups, tags=tags_s)


@st.composite
def fields_s(draw: Any) -> Dict[str, Any]:
    """Submit arguments: valid ones with a few (often none) replaced by anything."""
    f = {k: draw(v) for k, v in VALID.items()}
    for k in draw(st.lists(st.sampled_from(sorted(ANY)), max_size=3, unique=True)):
        f[k] = draw(ANY[k])
    if f["run_at"] is not None and draw(st.booleans()):
        f["delay"] = None
    f["depends_on"] = None
    return f


# ---- the tests ---------------------------------------------------------------------------------

def test_fuzz_submit_every_argument(db):
    with engine.Queue(db, max_payload=MAX_PAYLOAD) as q:
        model = Model(q)

        @FUZZ
        @given(fields_s())
        def one(f: Dict[str, Any]) -> None:
            bad = problems(f)
            try:
                tid = q.submit(f["name"], args=f["args"], kwargs=f["kwargs"], priority=f["priority"],
                               dedup_key=f["dedup_key"], max_attempts=f["max_attempts"], delay=f["delay"],
                               run_at=f["run_at"], group=f["group"], tags=f["tags"])
            except Exception as e:
                _check_error(e, bad, f)
                return
            assert not bad, f"an invalid submit ({sorted(bad)}) was accepted as {tid}: {f!r:.2000}"
            model.accepted(tid, f)

        one()
        assert len(model.tasks) > 10, "the fuzzing should have accepted some submits"
        model.drain()


def test_fuzz_submit_batch_keeps_the_valid_jobs(db):
    """A batch mixing valid and invalid jobs: each invalid one is rejected on
    its own with a typed error, every valid one is stored, the last of several
    jobs with one dedup key wins, and the outcome lines up with the input."""
    with engine.Queue(db, max_payload=MAX_PAYLOAD) as q:
        model = Model(q)
        keys = st.one_of(st.none(), st.sampled_from(["a", "b", b"b", "c"]))
        jobs_s = st.lists(st.one_of(
            fields_s(),
            st.builds(_fields, st.sampled_from(["t", "u"]), st.lists(json_values, max_size=2), st.none(),
                      st.integers(0, 255), keys, st.none(), st.none(), st.none(), st.none(), st.none())),
            max_size=12)

        @FUZZ
        @given(jobs_s, st.booleans())
        def one(batch: List[Dict[str, Any]], junk_item: bool) -> None:
            jobs: List[Any] = [engine.Job(f["name"], f["args"], f["kwargs"], priority=f["priority"],
                                          dedup_key=f["dedup_key"], max_attempts=f["max_attempts"], delay=f["delay"],
                                          run_at=f["run_at"], group=f["group"], tags=f["tags"]) for f in batch]
            fields: List[Optional[Dict[str, Any]]] = list(batch)
            if junk_item:
                jobs.insert(len(jobs) // 2, ("not", "a", "job"))
                fields.insert(len(fields) // 2, None)
            out = q.submit_batch(jobs)
            assert len(out) == len(jobs) == len(out.outcomes)
            valid = [k for k, f in enumerate(fields) if f is not None and not problems(f)]
            # Within the batch, the last valid job holding a key wins.
            winner: Dict[bytes, int] = {}
            for k in valid:
                f = fields[k]
                if f["dedup_key"] is not None:  # type: ignore[index]
                    winner[key_bytes(str.__str__(f["name"]), f["dedup_key"])] = k  # type: ignore[index]
            for k, (o, f) in enumerate(zip(out.outcomes, fields)):
                if f is None:
                    assert o.kind == "rejected" and isinstance(o.error, errors.InvalidType), o
                    assert isinstance(o.error, TypeError)
                    continue
                bad = problems(f)
                if bad:
                    assert o.kind == "rejected" and o.id is None, (o, f)
                    _check_error(o.error, bad, f)
                    continue
                assert o.kind in ("inserted", "duplicate"), (o, f)
                key = key_bytes(str.__str__(f["name"]), f["dedup_key"]) if f["dedup_key"] is not None else None
                if key is None:
                    assert o.kind == "inserted"
                    model.accepted(o.id, f)
                elif key in model.live_keys:  # a live task held it before this batch
                    assert (o.kind, o.id) == ("duplicate", model.live_keys[key])
                elif winner[key] == k:
                    assert o.kind == "inserted"
                    model.accepted(o.id, f)
            for k, (o, f) in enumerate(zip(out.outcomes, fields)):  # the twins point at the winner
                if f is not None and k in valid and f["dedup_key"] is not None:
                    key = key_bytes(str.__str__(f["name"]), f["dedup_key"])
                    assert o.id == model.live_keys[key], (k, o)
            assert sorted(out.inserted) == sorted(o.id for o in out.outcomes if o.kind == "inserted")
            assert [i for i, _ in out.rejected] == [k for k, o in enumerate(out.outcomes) if o.kind == "rejected"]

        one()
        assert len(model.tasks) > 10
        model.drain()


def test_fuzz_depends_on(db):
    """depends_on of every kind: ids of accepted tasks, unknown ids, ids out
    of range, wrong types.  Accepted dependents run once their parents did."""
    with engine.Queue(db) as q:
        model = Model(q)

        @FUZZ
        @given(st.data())
        def one(data: st.DataObject) -> None:
            known = sorted(model.tasks)
            # An index into the tasks accepted so far (drawn the same way whatever they are).
            parent = st.integers(0, 10**6).map(lambda i: known[i % len(known)] if known else 1 + i % 10)
            ids = st.one_of(parent, parent, st.integers(-2**64, 2**64), st.integers(2**62, 2**63 + 5),
                            st.booleans(), st.text(max_size=3), st.floats(), st.none())
            deps = data.draw(st.one_of(
                st.none(), st.lists(parent, max_size=5), st.lists(parent, max_size=3).map(tuple),
                st.sets(parent, max_size=3), st.lists(ids, max_size=4), st.lists(parent, max_size=3).map(iter),
                st.just([]), st.text(max_size=3), st.binary(max_size=3), st.integers(), st.just({1: 2})))
            deps_list = list(deps) if hasattr(deps, "__next__") else deps
            if hasattr(deps, "__next__"):
                deps = iter(deps_list)
            f = _fields("fuzz.dep", [len(known)], None, 0, None, None, None, None, None, None, deps_list)
            valid = (deps_list is None or (isinstance(deps_list, (list, tuple, set))
                                           and all(_is_int(p) and p in model.tasks for p in deps_list)))
            try:
                tid = q.submit("fuzz.dep", args=[len(known)], depends_on=deps)
            except Exception as e:
                assert not valid, f"valid depends_on {deps_list!r} refused: {e}"
                assert isinstance(e, errors.InvalidArgument), type(e).__mro__
                assert "depends_on" in str(e), e
                return
            assert valid, f"invalid depends_on {deps_list!r} accepted as {tid}"
            model.accepted(tid, f)

        one()
        assert len(model.tasks) > 10
        model.drain()


def _short_wait(y: Any) -> Any:
    """`y` as a timeout, unless it is a valid one that would wait long (or for ever)."""
    return 0 if y is None or _is_num(y) and not y < 0.05 else y


def test_fuzz_ids_and_management_arguments(db):
    """get, result, cancel, retry_dead, find, count, set_group_limit,
    cancel_group and claim with junk: typed errors or plain answers, never a
    raw OverflowError, cffi or apsw error, and the queue works on."""
    with engine.Queue(db) as q:
        tid = q.submit("fuzz.keep", args=[1], tags={"k": "v"}, group="g", max_attempts=10**6)
        ids = st.one_of(st.integers(-2**70, 2**70), st.integers(1, 2**63 - 1), st.just(tid), junk, any_text)

        @FUZZ
        @given(st.sampled_from(["get", "result", "cancel", "retry_dead", "find", "count", "set_group_limit",
                                "cancel_group", "claim", "dead_letters", "cancel_tagged", "claim_timeout",
                                "result_timeout"]),
               ids, st.one_of(junk, any_text, tags_s, st.integers(0, 10)))
        def one(op: str, x: Any, y: Any) -> None:
            call = {
                "get": lambda: q.get(x),
                "result": lambda: q.result(x, timeout=0),
                "cancel": lambda: q.cancel(x) if x != tid else None,
                "retry_dead": lambda: q.retry_dead(x),
                "find": lambda: q.find(y, limit=x),
                "count": lambda: q.count(y),
                "set_group_limit": lambda: q.set_group_limit(y, x),
                "cancel_group": lambda: q.cancel_group(y) if y != "g" else None,
                "claim": lambda: q.claim(max=x, timeout=0),
                "claim_timeout": lambda: q.claim(max=1, timeout=_short_wait(y)),
                "result_timeout": lambda: q.result(tid, timeout=_short_wait(y)),
                "dead_letters": lambda: q.dead_letters(x),
                "cancel_tagged": lambda: q.cancel_tagged(y) if y != {"k": "v"} else None,
            }[op]
            try:
                got = call()
            except (errors.TaskNotFound, errors.WaitTimeout):
                return
            except Exception as e:
                assert isinstance(e, errors.EngineError), f"{op}({x!r:.80}, {y!r:.80}): untyped {type(e).__mro__}: {e}"
                assert isinstance(e, (errors.InvalidArgument, TypeError, ValueError, LookupError)), type(e).__mro__
                return
            for job in got if op.startswith("claim") else ():  # put back anything claimed
                job.fail(None, retry=True)

        one()
        q.set_group_limit("g", None)
        info = q.get(tid)
        assert info is not None and info.state in ("pending", "running")
        jobs = q.claim(max=10, timeout=10)
        assert [j.id for j in jobs] == [tid] and jobs[0].args == (1,)


# ---- explicit regressions (each once broke the engine) ------------------------------------------

def test_lone_surrogates_are_refused_at_submit_and_do_not_kill_the_writer(db):
    """A lone surrogate cannot be stored as SQLite TEXT: it used to reach the
    writer, whose commit died on it, and every restarted writer replayed the
    request and died again (Queue() then waited 120 s for a writer)."""
    with engine.Queue(db) as q:
        for kw in ({"name": "t\ud800"}, {"group": "g\udcff"}, {"tags": {"k\udfff": "v"}}, {"tags": {"k": "\ud800"}}):
            name = kw.pop("name", "t")
            with pytest.raises(errors.InvalidArgument, match="surrogate"):
                q.submit(name, **kw)
        out = q.submit_batch([engine.Job("t"), engine.Job("t\ud800"), engine.Job("t", group="\udc80")])
        assert [o.kind for o in out.outcomes] == ["inserted", "rejected", "rejected"]
        with pytest.raises(errors.InvalidArgument):
            q.set_group_limit("\ud800", 1)
        # A surrogate in the payload or the dedup key is fine: JSON escapes it, the key is hashed.
        tid = q.submit("t", args=["\ud800"], dedup_key="\udc00")
        got = {j.id: j for j in q.claim(max=10, timeout=5)}
        assert got[tid].args == ("\ud800",) and out.outcomes[0].id in got


def test_int_and_str_subclasses_travel_as_plain_values(db):
    """An IntEnum priority or a str subclass name used to make the request
    unmarshallable: a bare ValueError escaped, after ids were reserved, and
    aborted the whole batch."""
    with engine.Queue(db) as q:
        parent = q.submit("t")
        Tid = enum.IntEnum("Tid", {"PARENT": parent})
        tid = q.submit(Name("fuzz.task"), priority=Prio.HIGH, max_attempts=Prio.LOW, group=Name("g"),
                       tags={Name("k"): Name("v")}, depends_on=[Tid.PARENT])
        out = q.submit_batch([engine.Job(Name("u"), priority=Prio.LOW), engine.Job("u", priority=Prio.HIGH)])
        assert [o.kind for o in out.outcomes] == ["inserted", "inserted"]
        info = q.get(Tid.PARENT)
        assert info.id == parent
        info = q.get(tid)
        assert (info.name, info.priority, info.max_attempts, info.state) == ("fuzz.task", 200, 1, "waiting")
        assert type(q.reader.task(tid)["name"]) is str
        assert q.find({"k": "v"}) == [tid]
        q.set_group_limit(Name("g"), Prio.LOW)
        assert q.cancel_group(Name("g")) == 1
        Tid = enum.IntEnum("Tid", {"U": out.outcomes[0].id})
        assert q.cancel(Tid.U)
        jobs = q.claim(max=10, timeout=5)
        assert sorted(j.id for j in jobs) == sorted([parent, out.outcomes[1].id])


def test_unserialisable_payloads_are_typed_and_reject_one_batch_job(db):
    """Nesting too deep (RecursionError), a cycle or an int too long for
    str() used to escape as bare RecursionError/ValueError, and a deep job
    aborted its whole batch."""
    with engine.Queue(db) as q:
        for bad in (_nested(100_000), _cyclic(), 10 ** 5000, {1, 2}, Junk(), BadRepr(), b"raw"):
            with pytest.raises(errors.NotSerializable) as ei:
                q.submit("t", args=[bad])
            assert isinstance(ei.value, TypeError) and isinstance(ei.value, errors.InvalidArgument)
            assert "serialise" in str(ei.value)
        with pytest.raises(errors.InvalidArgument, match="task name"):
            q.submit(BadRepr())  # an error message never fails on the value it names
        with pytest.raises(errors.NotSerializable, match="nested too deeply"):
            q.submit("t", kwargs={"deep": _nested(100_000)})
        out = q.submit_batch([engine.Job("t", args=[1]), engine.Job("t", args=[_nested(100_000)]),
                              engine.Job("t", args=[_cyclic()]), engine.Job("t", args=[2])])
        assert [o.kind for o in out.outcomes] == ["inserted", "rejected", "rejected", "inserted"]
        assert all(isinstance(o.error, errors.NotSerializable) for o in out.outcomes[1:3])
        # NaN and infinities are stored (Python's JSON reads them back).
        tid = q.submit("t", args=[float("nan"), float("inf"), -float("inf")])
        got = {j.id: j for j in q.claim(max=10, timeout=5)}
        a = got[tid].args
        assert math.isnan(a[0]) and a[1:] == (math.inf, -math.inf)
        assert sorted(j.args[0] for i, j in got.items() if i != tid) == [1, 2]


def test_bad_datetimes_and_ids_are_typed_errors(db):
    """datetime.min as run_at raised a bare ValueError (year 0 is out of
    range); an id of 2**64 reached cffi and SQLite as a bare OverflowError."""
    with engine.Queue(db) as q:
        with pytest.raises(errors.InvalidArgument, match="run_at"):
            q.submit("t", run_at=datetime.datetime.min)
        for bad in (2**64, -1, 0, True, "1", 1.0):
            for call in (q.get, q.cancel, q.retry_dead, lambda t: q.result(t, timeout=0)):
                with pytest.raises(errors.InvalidArgument, match="task id"):
                    call(bad)
        with pytest.raises(errors.InvalidArgument, match="timeout"):
            q.result(1, timeout="soon")
        assert q.get(2**63 - 1) is None
        tid = q.submit("t")
        assert [j.id for j in q.claim(max=5, timeout=5)] == [tid]


def test_a_job_whose_request_exceeds_the_request_area_is_rejected_alone(db):
    """With a small request area (setting request_bytes) a payload under
    max_payload may still not fit one request: that job used to raise a bare
    req_reserve error out of submit_batch, losing the outcomes of the rest."""
    with engine.Queue(db, request_bytes=4096) as q:
        room = q._request_room
        with pytest.raises(errors.PayloadTooLarge, match="request_bytes"):
            q.submit("t", args=["x" * room])
        out = q.submit_batch([engine.Job("t", args=[i, "x" * n]) for i, n in enumerate((10, room, 900, 900, 20))])
        assert [o.kind for o in out.outcomes] == ["inserted", "rejected", "inserted", "inserted", "inserted"]
        assert isinstance(out.outcomes[1].error, errors.PayloadTooLarge)
        jobs = q.claim(max=10, timeout=5)
        assert sorted(j.args[0] for j in jobs) == [0, 2, 3, 4]
        with pytest.raises(errors.PayloadTooLarge, match="request_bytes"):
            jobs[0].complete("y" * room)
        for j in jobs[1:]:
            assert j.complete("y" * 900)  # results that fit are sent in requests that fit
        assert jobs[0].fail(RuntimeError("z" * 10_000), retry=False)  # a long error is cut to fit
        assert q.result(jobs[1].id, timeout=30) == "y" * 900
        with pytest.raises(errors.TaskFailed, match="RuntimeError"):
            q.result(jobs[0].id, timeout=30)


def test_complete_with_a_result_is_not_reported_fenced_when_the_writer_is_quick(db, monkeypatch):
    """complete(result) and fail(error) hand the outcome to the writer and
    then asked whether the attempt was still running: when the writer had
    settled it in between (it spins for requests), a successful complete
    returned False, as if fenced.  Simulated here by a writer that settles
    each report before _report returns."""
    with engine.Queue(db) as q:
        real = q._report

        def report_and_wait_for_the_writer(reports):
            real(reports)
            for tid, *_ in reports:
                deadline = time.monotonic() + 10
                while (s := q.seg.get(tid)) is not None and s.state == engine.shm.RUNNING:
                    assert time.monotonic() < deadline, "the writer never settled the report"
                    time.sleep(0.001)

        monkeypatch.setattr(q, "_report", report_and_wait_for_the_writer)
        a, b = q.submit("t", args=[1]), q.submit("t", args=[2], max_attempts=1)
        jobs = {j.id: j for j in q.claim(max=2, timeout=5)}
        assert jobs[a].complete({"value": 1}) is True
        assert jobs[b].fail(RuntimeError("no"), retry=False) is True
        assert q.result(a, timeout=30) == {"value": 1}
        with pytest.raises(errors.TaskFailed, match="RuntimeError"):
            q.result(b, timeout=30)
        # A fenced attempt still says so, and sends nothing.
        c = q.submit("t", args=[3])
        [job] = q.claim(max=1, timeout=5)
        assert q.cancel(c)
        assert job.complete({"late": True}) is False


def test_a_request_the_writer_cannot_store_is_refused_and_the_writer_carries_on(db):
    """Defence in depth behind the producer's checks: an item the database
    refuses (here a name with a lone surrogate, sent around the checks)
    killed the writer with a UnicodeEncodeError, and every restarted writer
    replayed the request and died again.  Now the request is refused and
    the writer lives."""
    from engine import paths, protocol
    from engine_helpers import send_raw, writer_pid

    with engine.Queue(db) as q:
        pid = writer_pid(db)
        good = q._item("t", [1], {}, 0, None, None, engine.shm.now_us())
        for bad in (good[:1] + ("t\ud800",) + good[2:], good[:8] + ("g\udc00",) + good[9:]):
            bad = (q.seg.reserve_ids(1),) + bad[1:]
            with pytest.raises(errors.SubmitFailed, match="UnicodeEncodeError"):
                protocol.decode_answer(send_raw(q, protocol.encode_request(0, [bad])))
        assert writer_pid(db) == pid and paths.writer_alive(db)
        q.submit("t", group="g2")  # a group the failed turn did not leave half-known
        tid = q.submit("t", args=(2,), group="g\u00e9")
        assert sorted(j.id for j in q.claim(max=5, timeout=5))[-1] == tid


# ---- oversize payloads: the max_payload setting --------------------------------------------------

def test_a_configured_max_payload_holds_for_submits_batches_and_results(db):
    """The limit is on the serialised bytes: exactly the limit passes, one
    byte more is PayloadTooLarge naming both sizes and the setting, in a
    batch for that job alone; results are held to it too (complete raises,
    and a task whose result is too big ends dead with that error)."""
    limit = 1000
    overhead = len('[[""],{}]')  # JSON of args=[s], kwargs={}
    with engine.Queue(db, max_payload=limit) as q:
        assert q.settings.max_payload == limit
        at = q.submit("t", args=["x" * (limit - overhead)])
        with pytest.raises(errors.PayloadTooLarge, match=rf"is {limit + 1} bytes; the limit is {limit} "
                                                          r"\(setting max_payload\)"):
            q.submit("t", args=["x" * (limit - overhead + 1)])
        with pytest.raises(errors.PayloadTooLarge):
            q.submit("t", kwargs={"k": "x" * limit})
        out = q.submit_batch([engine.Job("t", args=["a"]), engine.Job("t", args=["x" * limit]),
                              engine.Job("t", args=["x" * (limit - overhead)]), engine.Job("t", args=["b"])])
        assert [o.kind for o in out.outcomes] == ["inserted", "rejected", "inserted", "inserted"]
        assert isinstance(out.outcomes[1].error, errors.PayloadTooLarge) and "max_payload" in str(out.rejected[0][1])
        jobs = {j.args[0][:1]: j for j in q.claim(max=10, timeout=5)}
        assert len(jobs) == 3 and jobs["x"].id in (at, out.outcomes[2].id)
        # Results: a JSON string of limit - 2 characters is exactly the limit.
        assert jobs["a"].complete("y" * (limit - 2))
        with pytest.raises(errors.PayloadTooLarge, match=f"the result of task {jobs['b'].id} is {limit + 1} bytes"):
            jobs["b"].complete("y" * (limit - 1))
        assert jobs["b"].fail(errors.PayloadTooLarge("the result was too big"), retry=False)
        assert q.result(jobs["a"].id, timeout=30) == "y" * (limit - 2)
        with pytest.raises(errors.TaskFailed, match="PayloadTooLarge"):
            q.result(jobs["b"].id, timeout=30)

        # Through the worker loop's execute: too big a result fails the task for good.
        @q.task(name="big.result")
        def big():
            return "z" * limit

        tid = q.submit("big.result")
        [job] = q.claim(max=1, timeout=5)
        assert engine.workers.execute(q, job) is False
        with pytest.raises(errors.TaskFailed, match="PayloadTooLarge") as ei:
            q.result(tid, timeout=30)
        assert ei.value.state == "dead" and "max_payload" in ei.value.error["message"]
        assert q.get(tid).attempts == 1


def test_max_payload_from_the_environment(db, monkeypatch):
    monkeypatch.setenv("HEADRACE_MAX_PAYLOAD", "100")
    with engine.Queue(db) as q:
        assert q.settings.max_payload == 100
        with pytest.raises(errors.PayloadTooLarge, match="the limit is 100"):
            q.submit("t", args=["x" * 100])
        q.submit("t", args=["x" * 50])
    monkeypatch.setenv("HEADRACE_MAX_PAYLOAD", "lots")
    with pytest.raises(errors.InvalidArgument, match="HEADRACE_MAX_PAYLOAD"):
        engine.Queue(db)
