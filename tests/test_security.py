"""Security: owner-only files whatever the umask, foreign or loosened lock
files refused, no shell anywhere, and nothing from the database names code
to run (task names resolve only to registered functions; pickled payloads
load only where pickle was opted into)."""
from __future__ import annotations

import ast
import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest

import engine
from engine import errors, paths, shm
from engine.workers import execute
from engine_helpers import wait_for
from helpers import CHILD_CWD, child_env, run_child

PACKAGE = pathlib.Path(engine.__file__).parent
OTHER_UID = 4242
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_file_is_owner_only_whatever_the_umask(tmp_path):
    """With umask 0 in the opening process (and so in the writer it starts):
    the database, its -wal and -shm, the lock, clients and log files and the
    segment are all 0600."""
    db = str(tmp_path / "q.db")
    r = run_child(f"""
        import json, os
        os.umask(0)
        import engine
        from engine import paths, shm
        db = {db!r}
        with engine.Queue(db) as q:
            q.submit("t", args=[1])
            files = [db, db + "-wal", db + "-shm", paths.lock_path(db), paths.clients_path(db), paths.log_path(db),
                     q.seg.path]
            print(json.dumps({{f: os.stat(f).st_mode & 0o777 for f in files}}))
        open(db + ".probe", "w").close()  # what umask 0 makes of a plain file
        print(os.stat(db + ".probe").st_mode & 0o777)
    """)
    assert r.returncode == 0, r.stderr
    modes, probe = r.stdout.splitlines()
    assert int(probe) == 0o666, "the umask really was 0"
    modes = json.loads(modes)
    assert len(modes) == 7
    assert {f: oct(m) for f, m in modes.items() if m != 0o600} == {}
    wait_for(lambda: not paths.writer_alive(db), timeout=30, what="the writer exited")


@root_only
@pytest.mark.parametrize("side", [".lock", ".clients", ".writer.log", ""])
def test_a_file_of_another_user_is_refused(db, side):
    path = db + side
    open(path, "w").close()
    os.chmod(path, 0o600)
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(errors.UnsafeFile, match=f"belongs to uid {OTHER_UID}") as ei:
        engine.Queue(db)
    assert isinstance(ei.value, PermissionError) and "owner" in str(ei.value)
    assert os.stat(path).st_uid == OTHER_UID  # untouched
    os.unlink(path)
    assert not paths.writer_alive(db)


@root_only
def test_the_writer_itself_refuses_a_lock_file_of_another_user(db):
    open(db + ".lock", "w").close()
    os.chown(db + ".lock", OTHER_UID, OTHER_UID)
    r = subprocess.run([sys.executable, "-m", "engine.writer", db], capture_output=True, text=True, env=child_env(),
                       cwd=CHILD_CWD, timeout=60)
    assert r.returncode == paths.EXIT_UNSAFE and f"belongs to uid {OTHER_UID}" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("side", [".lock", ".clients"])
@pytest.mark.parametrize("mode", [0o644, 0o660, 0o606])
def test_a_lock_file_open_to_others_is_refused(db, side, mode):
    """Only headrace makes these files, always 0600: one open to others was
    changed by someone (who may hold it open), so it is refused, not fixed."""
    open(db + side, "w").close()
    os.chmod(db + side, mode)
    with pytest.raises(errors.UnsafeFile, match="open to other users") as ei:
        engine.Queue(db)
    assert oct(mode)[2:] in str(ei.value)
    assert _mode(db + side) == mode  # left as found
    os.chmod(db + side, 0o600)
    with engine.Queue(db) as q:
        q.submit("t")


def test_a_database_or_log_open_to_others_is_made_owner_only(db):
    """A database copied in with mode 0644 (or its log) is made 0600 again."""
    with engine.Queue(db):
        pass
    wait_for(lambda: not paths.writer_alive(db), timeout=30, what="the writer exited")
    for f in (db, paths.log_path(db)):
        os.chmod(f, 0o644)
    with engine.Queue(db) as q:
        q.submit("t")
        assert _mode(db) == 0o600 and _mode(paths.log_path(db)) == 0o600


# ---- nothing runs a shell, nothing resolves names to code ------------------------------------

_SHELL_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "pty.spawn",
                "os.execl", "os.execlp", "os.execle", "os.execlpe", "os.execvp", "os.execvpe", "os.spawnl",
                "os.spawnlp", "os.spawnv", "os.spawnvp", "os.posix_spawnp"}
_DYNAMIC = {"eval", "exec", "compile", "__import__", "importlib.import_module", "importlib.__import__",
            "pickle.load", "pickle.loads", "runpy.run_module", "runpy.run_path"}
#: Where resolving a name or bytes to code is the point, with the reason.
_DYNAMIC_OK = {("cli.py", "importlib.import_module"),  # headrace worker MODULE:QUEUE, from the command line
               ("api.py", "pickle.loads")}  # serializer='pickle' only (see the pickled-payload test)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path, node, _dotted(node.func)


def test_nothing_in_the_package_runs_a_shell():
    found = []
    for path, node, name in _calls():
        where = f"{path.name}:{node.lineno} {name}"
        if name in _SHELL_CALLS:
            found.append(where)
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{where}(shell=...)")
        if name.startswith("subprocess.") and node.args and not isinstance(node.args[0], (ast.List, ast.Tuple)):
            found.append(f"{where}: a command that is not a literal list")
    assert found == [], f"shell use in the package: {found}"
    assert any(name == "subprocess.Popen" for _, _, name in _calls()), "the scan sees the writer's Popen"


def test_nothing_in_the_package_resolves_names_to_code_except_where_meant():
    found = [f"{path.name}:{node.lineno} {name}" for path, node, name in _calls()
             if name in _DYNAMIC and (path.name, name) not in _DYNAMIC_OK]
    assert found == [], f"dynamic code resolution in the package: {found}"


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that leaves a mark if anything ever imports it."""
    mark = tmp_path / "imported"
    (tmp_path / "hr_evil_mod.py").write_text(f"open({str(mark)!r}, 'w').write('x')\ndef boom(*a):\n    "
                                             f"open({str(mark)!r}, 'w').write('called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return mark


def test_task_names_from_the_database_resolve_only_to_registered_functions(db, evil_module, monkeypatch):
    """A task whose name is an importable path is never imported or called:
    it fails as unknown, dead, with an error naming it; the registered task
    next to it runs."""
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(("os.system", a)) or 0)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: calls.append(("subprocess.call", a)) or 0)
    with engine.Queue(db) as q:
        @q.task(name="ok.task")
        def ok(x):
            return x * 2

        hostile = ["os.system", "subprocess.call", "builtins.eval", "builtins.exec", "hr_evil_mod.boom",
                   "hr_evil_mod:boom", "engine.cli.main", "__import__", "ok.task.__globals__", "ok"]
        ids = {name: q.submit(name, args=["touch /tmp/headrace-pwned"]) for name in hostile}
        good = q.submit("ok.task", args=[21])
        ran = {}
        while len(ran) < len(ids) + 1:
            jobs = q.claim(max=100, timeout=10)
            assert jobs, f"only {len(ran)} of {len(ids) + 1} tasks came out"
            for job in jobs:
                ran[job.id] = execute(q, job)
        assert ran[good] is True and q.result(good, timeout=30) == 42
        for name, tid in ids.items():
            assert ran[tid] is False
            with pytest.raises(errors.TaskFailed) as ei:
                q.result(tid, timeout=30)
            assert ei.value.state == "dead" and ei.value.error["type"] == "UnknownTask"
            assert f"no task named {name!r}" in ei.value.error["message"]
            assert q.get(tid).attempts == 1  # dead at once, never retried
    assert calls == [] and not evil_module.exists() and "hr_evil_mod" not in sys.modules
    assert not os.path.exists("/tmp/headrace-pwned")


def test_a_pickled_payload_is_never_loaded_by_a_json_queue(db, tmp_path):
    """A pickled task (serializer='pickle', trusted producers only) is not
    unpickled by a worker of a queue opened with JSON: unpickling runs code.
    It fails dead with an error that says why; the pickle queue runs it."""
    mark = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(mark), "w"))

    with engine.Queue(db, serializer="pickle") as producer:
        evil = producer.submit("t", args=[Boom()])
        fine = producer.submit("t", args=[{1, 2}])
    with engine.Queue(db) as q:
        @q.task(name="t")
        def t(x):
            return "ran"

        jobs = q.claim(max=10, timeout=5)
        assert jobs == []  # both refused at the claim, before any code
        for tid in (evil, fine):
            with pytest.raises(errors.TaskFailed, match="UntrustedPayload") as ei:
                q.result(tid, timeout=30)
            assert "serializer='pickle'" in ei.value.error["message"]
    assert not mark.exists()
    with engine.Queue(db, serializer="pickle") as p:
        tid = p.submit("t", args=[{3}])
        [job] = p.claim(max=1, timeout=5)
        assert job.id == tid and job.args == ({3},)
        assert job.complete(Boom())  # a pickled result that runs code when loaded
        p.result(tid, timeout=30).close()  # the pickle queue loads it (its opt-in): open() ran
        assert mark.exists()
    mark.unlink()
    with engine.Queue(db) as q:
        with pytest.raises(errors.UntrustedPayload, match="serializer='pickle'"):
            q.result(tid, timeout=30)
        info = q.get(tid)
        assert info.state == "completed" and info.result is None
    assert not mark.exists()


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_planted_sqlite_side_file_is_refused(db, suffix, tmp_path):
    """SQLite opens PATH-wal and PATH-shm as it finds them: one planted in a
    shared directory (a symlink, or another user's file) would let its owner
    read or inject database pages.  They are checked like headrace's own."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, db + suffix)
    with pytest.raises(errors.UnsafeFile, match="symlink"):
        engine.Queue(db)
    os.unlink(db + suffix)
    if os.geteuid() == 0:
        open(db + suffix, "w").close()
        os.chown(db + suffix, OTHER_UID, OTHER_UID)
        with pytest.raises(errors.UnsafeFile, match=f"belongs to uid {OTHER_UID}"):
            engine.Queue(db)
        os.unlink(db + suffix)
    with engine.Queue(db) as q:
        q.submit("t")


def test_writer_log_and_segment_names_cannot_escape_their_directories(db):
    """The segment name is derived from the file's identity (device, inode),
    never from the path text, and lives in the segment directory."""
    with engine.Queue(db) as q:
        name = paths.segment_name(db)
        assert name.startswith("db-") and "/" not in name
        assert os.path.dirname(q.seg.path) == shm.SHM_DIR
