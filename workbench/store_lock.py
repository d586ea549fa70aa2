"""One writer at a time for a store (or an evaluate folder): `StoreLock`, an flock on a hidden file beside it that
the kernel releases when its process ends, even by SIGKILL, with who holds it written beside, so that a refused
writer can name its holder. workbench/store.py's `StoreWriter` takes it before it reads anything; `generate` and
`evaluate` take it for their folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from stat import S_ISVTX

from workbench.errors import WorkbenchError

NAME_MAX = 255  # bytes in one file name on Linux's disks (ext4, xfs, btrfs) and most others


class StoreBusy(WorkbenchError):
    """Another process holds the store's lock: a refusal to try again later, not bad input. The CLI exits with
    `exit_status` (75, sysexits' EX_TEMPFAIL: "try again later"), so that a batch script can tell it from a bad
    command line (2) and retry."""

    exit_status = 75


def lock_file(path: str | Path) -> Path:
    """The lock file of a store: `.NAME.lock` beside it (the store folder itself is replaced as a whole), NAME the
    store's real path: a symlink to a store, or a path through a symlinked folder, takes the same lock."""
    path = Path(path).resolve()
    return path.with_name(f".{path.name}.lock")


class StoreLock:
    """The right to write one store, held by one process at a time: an flock on `.NAME.lock` beside the store
    (`filelock`), which the kernel releases when the process ends, even by SIGKILL. The holder writes who it is
    (pid, host, command, since when) to `.NAME.lock.json`, so that a refused writer can say who holds the store."""

    def __init__(self, path: str | Path, what: str = "a store", option: str = "--out", command: str | None = None):
        self.path = Path(path)
        self.command = command  # who holds it, for a refused writer (None: this process's command line)
        self.what = what  # what it guards, for the refusal: "a store", "an evaluate folder"
        self.option = option  # the command line's name for the path, for the refusal
        self.file = lock_file(self.path)
        self.holder_file = self.file.with_name(self.file.name + ".json")
        self._lock = None

    def acquire(self) -> StoreLock:
        """Take the lock now or raise WorkbenchError naming the store and its holder (never waits)."""
        from filelock import FileLock, Timeout

        from models.files import atomic_write_bytes, ensure_writable_dir

        self._check_name()
        ensure_writable_dir(self.path.parent)  # the store's folder must take the lock file and the store
        lock = FileLock(str(self.file))
        try:
            lock.acquire(timeout=0)
        except PermissionError:  # (a lock file another user made, read-only to this one: umask 022)
            owner = "another user"
            with contextlib.suppress(OSError, ImportError, KeyError):
                uid = self.file.stat().st_uid
                owner = f"user id {uid}"
                import pwd

                owner = f"user {pwd.getpwuid(uid).pw_name!r}"
            try:  # a sticky folder (/tmp, shared scratch) refuses to open another user's file, writable or not
                owner_only = bool(self.file.parent.stat().st_mode & S_ISVTX) or os.access(self.file, os.W_OK)
            except OSError:
                owner_only = False
            advice = ("in this folder only its owner may open it: ask them to remove it (no run holds it once their "
                      "run ended)" if owner_only else
                      "ask them to make it group-writable (chmod g+w; a umask of 002 makes it so)")
            raise WorkbenchError(
                f"cannot take the lock of {str(self.path)!r}: its lock file {str(self.file)!r} belongs to {owner} and "
                f"this user may not open it; {advice}, or choose another {self.option}") from None
        except Timeout:
            holder = self.holder()
            by = ("this process itself (another call of this Python session: a notebook cell or a thread still "
                  f"running; {holder})" if holder.startswith(f"pid {os.getpid()} on {socket.gethostname()},")
                  else f"another process ({holder})")
            raise StoreBusy(
                f"{str(self.path)!r} is being written by {by}; {self.what} takes one writer at a time: wait for that "
                f"run to end (a later run resumes where it stopped), or choose another {self.option}") from None
        self._lock = lock
        me = dict(pid=os.getpid(), host=socket.gethostname(), command=(self.command or shlex.join(sys.argv))[:200],
                  since=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write_bytes(self.holder_file, json.dumps(me).encode())
        return self

    def _check_name(self) -> None:
        """Refuse, before any file is made, a path no writer could finish: a file where the folder goes (its lock
        file was left beside it), a name with `::` (zarr reads it as a chain of URLs: the run failed at its first
        write), a name too long for the hidden files beside it (`.NAME.lock.json.PID-XXXXXXXX.tmp.json`: 38 bytes
        more; a name the disk allows failed after the work, naming one of those)."""
        room = NAME_MAX - 38
        if self.path.exists() and not self.path.is_dir():
            raise WorkbenchError(f"{self.option} {str(self.path)!r} is a file, not {self.what}: give a folder's "
                                 "path (new or existing)")
        real = self.path.resolve()  # (a writer writes beside the real folder: a symlink's target)
        if "::" in str(real):
            where = "" if "::" in str(self.path) else f" (its real path {str(real)!r})"
            raise WorkbenchError(f"{self.option} {str(self.path)!r}{where} holds '::', which zarr reads as a chain of "
                                 "URLs (its writes would fail): choose a path without it")
        name = real.name  # (the real folder's name, a symlink's target: the hidden files go beside it)
        if len(name.encode()) > room:
            raise WorkbenchError(f"{self.option} {str(self.path)!r}: its name is {len(name.encode())} bytes, at most "
                                 f"{room} here (the hidden files beside it add 38 to a name's {NAME_MAX}): choose a "
                                 "shorter name")

    def holder(self, wait: float = 1.0) -> str:
        """Who holds the lock, from its holder file. A holder that has just taken the lock may not have written
        the file yet (it still names an earlier, dead holder): wait up to `wait` seconds for a live one."""
        deadline = time.monotonic() + wait
        while True:
            try:
                h = json.loads(self.holder_file.read_text())
                text = f"pid {h['pid']} on {h['host']}, since {h['since']}: {h['command']}"
                alive = h["host"] != socket.gethostname() or _alive(int(h["pid"]))
            except (OSError, ValueError, KeyError, TypeError):
                text, alive = "holder unknown", False
            if alive or time.monotonic() > deadline:
                return text if alive else "holder unknown"
            time.sleep(0.05)

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self.holder_file.unlink()
            self._lock.release()
            self._lock = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
