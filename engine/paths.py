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
import re
import stat
import subprocess
import sys
from typing import List, Optional, Tuple

from . import errors


def lock_path(db: str) -> str:
    return db + ".lock"


def clients_path(db: str) -> str:
    return db + ".clients"


def log_path(db: str) -> str:
    return db + ".writer.log"


def open_private(path: str, flags: int = os.O_RDWR | os.O_CREAT, *, strict: bool = False) -> int:
    """Open (creating) `path` readable and writable by the owner only.

    Refuses (:class:`errors.UnsafeFile`) a symlink, anything but a regular
    file, and a file of another user.  A file open to others is made
    owner-only again, or with `strict` (the lock files, which nobody but
    headrace creates) refused.  Any other failure is a StoreError."""
    try:
        # O_NONBLOCK: opening a FIFO planted here must not hang.
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise errors.UnsafeFile(f"{path} is a symlink; refusing to follow it (remove it and retry)") from None
        raise errors.StoreError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.UnsafeFile(f"{path} is not a regular file; refusing to use it (remove it and retry)")
        if st.st_uid != os.geteuid():
            raise errors.UnsafeFile(f"{path} belongs to uid {st.st_uid}, not to this process's uid "
                                    f"{os.geteuid()}; refusing to use it (run as its owner, or remove it)")
        if st.st_mode & 0o077:
            if strict:
                raise errors.UnsafeFile(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                                        "headrace creates it 0600, so someone changed it; refusing to use it "
                                        "(check who did, then remove it and retry)")
            os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append(path: str, text: str) -> None:
    """Append `text` with one write(2) on an O_APPEND file (created 0600):
    whole lines, even from a process killed right after."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def check_sqlite_files(db: str) -> None:
    """Refuse a -wal, -shm or -journal file of `db` that SQLite would open
    but headrace would not make: of another user (planted in a shared
    directory to read or inject database pages), a symlink, not a regular
    file.  One open to others is made owner-only."""
    for suffix in ("-wal", "-shm", "-journal"):
        path = db + suffix
        if os.path.lexists(path):
            os.close(open_private(path, os.O_RDWR))


def segment_name(db: str) -> str:
    """The segment of database `db`: derived from the file's identity, so
    that every path to the same file names the same segment."""
    st = os.stat(db)
    return f"db-{st.st_dev:x}-{st.st_ino:x}"


#: A writer builds segment NAME as NAME + TEMP_MARK + its pid, then renames it into place.
TEMP_MARK = ".new"
_TEMP_SEGMENT = re.compile(r"^db-[0-9a-f]+-[0-9a-f]+" + re.escape(TEMP_MARK) + r"(\d+)$")


def stale_segments(directory: Optional[str] = None, remove: bool = False) -> List[Tuple[str, str]]:
    """(file, why) of each segment of this user that no database will use
    again: the database it names is gone or was replaced by another file,
    or a writer that died left it half built; and no process has it
    mapped.  With `remove`, each is deleted as it is found.  A segment of a
    database that is still there is kept, with what its killed writer had
    not yet written; so is one made before segments named their database."""
    from . import shm  # not at the top: shm imports faults, which imports this module
    directory = directory or shm.SHM_DIR
    out: List[Tuple[str, str]] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for f in names:
        if not f.startswith(shm.PREFIX + "db-"):
            continue
        name = f[len(shm.PREFIX):]
        path = os.path.join(directory, f)
        why = _why_stale(name, path)
        if why and shm.unused(path, unlink=remove):
            out.append((path, why))
    return out


def _why_stale(name: str, path: str) -> Optional[str]:
    from . import shm
    temp = _TEMP_SEGMENT.match(name)
    if temp:
        return None if pid_alive(int(temp.group(1))) else f"half built by writer {temp.group(1)}, which is gone"
    note = shm.read_note(path)
    if not note:
        return None
    db = os.fsdecode(note)
    try:
        now = segment_name(db)
    except FileNotFoundError:
        return f"its database {db} is gone"
    except OSError:
        return None  # unreadable just now (a directory we may not enter): not known to be gone
    return f"its database {db} was replaced by another file" if now != name else None


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
    fd = open_private(lock_path(db), strict=True)
    try:
        if try_flock(fd, exclusive=False):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def spawn_writer(db: str, args: List[str], timeout: float = 120.0) -> None:
    """Start a detached writer for `db` (it exits at once if one is running).

    Returns once the writer is serving, or raises the error that kept it
    from starting (the class of a database error is kept: StoreCorrupt,
    SchemaMismatch, UnsafeFile...), never leaving the caller to wait for a
    writer that died."""
    log = open_private(log_path(db), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        # The writer double-forks, so it is never our zombie; we wait for
        # the intermediate process, which exits once the writer reports
        # that it started (or why it could not).
        p = subprocess.Popen([sys.executable, "-m", "engine.writer", "--daemon", db, *args],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                             start_new_session=True, env=_writer_env(), cwd="/")
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise errors.WriterUnavailable(f"the writer for {db} did not start within {timeout:.0f} s "
                                           f"(see {log_path(db)})") from None
    finally:
        os.close(log)
    if rc != 0:
        cls = _STORE_EXITS.get(rc, errors.WriterUnavailable)
        raise cls(f"the writer for {db} failed to start: {_last_line(log_path(db))} (see {log_path(db)})")


#: The writer's exit codes for a database it cannot use, by the class of the
#: error (engine.writer exits with them; spawn_writer raises the class again).
EXIT_STORE, EXIT_CORRUPT, EXIT_SCHEMA, EXIT_UNSAFE = 3, 4, 5, 6
_STORE_EXITS = {EXIT_STORE: errors.StoreError, EXIT_CORRUPT: errors.StoreCorrupt,
                EXIT_SCHEMA: errors.SchemaMismatch, EXIT_UNSAFE: errors.UnsafeFile}


def exit_code(e: errors.StoreError) -> int:
    """The writer's exit code for store error `e`."""
    for code in (EXIT_UNSAFE, EXIT_SCHEMA, EXIT_CORRUPT):
        if isinstance(e, _STORE_EXITS[code]):
            return code
    return EXIT_STORE


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
