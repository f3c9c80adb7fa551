"""The files beside a database, the locks on them, and starting the writer.

- ``PATH.lock``: the writer holds an exclusive ``flock`` on it for its whole
  life, so two writers never run at once, and a crashed one frees it.
- ``PATH.clients``: every open queue holds a shared ``flock`` on it; the
  writer exits once it can take it exclusively (no client is left).
- ``PATH.writer.log``: the writer's stderr.
"""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from typing import List, Optional

from . import errors


def lock_path(db: str) -> str:
    return db + ".lock"


def clients_path(db: str) -> str:
    return db + ".clients"


def log_path(db: str) -> str:
    return db + ".writer.log"


def open_private(path: str, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """Open (creating) `path` readable and writable by the owner only, refusing a foreign file."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise errors.EngineError(f"{path} belongs to uid {st.st_uid}, not {os.geteuid()}; refusing to use it")
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def segment_name(db: str) -> str:
    """The segment of database `db`: derived from the file's identity, so
    that every path to the same file names the same segment."""
    st = os.stat(db)
    return f"db-{st.st_dev:x}-{st.st_ino:x}"


def try_flock(fd: int, exclusive: bool) -> bool:
    """Take a lock on `fd` without blocking; False if another process holds it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def pid_alive(pid: int) -> bool:
    """Does process `pid` exist?"""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def writer_pid(db: str) -> Optional[int]:
    """The pid the last writer of `db` wrote into its lock file (it may have exited since)."""
    try:
        with open(lock_path(db)) as f:
            txt = f.read().strip()
        return int(txt) if txt else None
    except (OSError, ValueError):
        return None


def writer_alive(db: str) -> bool:
    """Is a writer holding `db`'s writer lock right now?"""
    fd = open_private(lock_path(db))
    try:
        if try_flock(fd, exclusive=False):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def spawn_writer(db: str, args: List[str]) -> None:
    """Start a detached writer for `db` (it exits at once if one is running)."""
    log = open_private(log_path(db), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        # The writer double-forks, so it is never our zombie; we only wait
        # for the intermediate process, which exits at once.
        p = subprocess.Popen([sys.executable, "-m", "engine.writer", "--daemon", db, *args],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                             start_new_session=True, env=_writer_env(), cwd="/")
        rc = p.wait(timeout=30)
    finally:
        os.close(log)
    if rc != 0:
        cls = errors.StoreError if rc == EXIT_STORE else errors.WriterUnavailable
        raise cls(f"the writer for {db} failed to start: {_last_line(log_path(db))} (see {log_path(db)})")


#: The writer's exit code for a database it cannot open (engine.writer.EXIT_STORE).
EXIT_STORE = 3


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
        return lines[-1] if lines else "no message"
    except OSError:
        return "no message"


def _writer_env() -> Optional[dict]:
    env = dict(os.environ)
    # The writer imports the very package this process imported (it runs
    # from "/", so no checkout in the working directory can shadow it).
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
