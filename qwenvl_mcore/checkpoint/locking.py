"""Exclusive locks on a path (an output directory, a run directory) held for a command's lifetime.

A lock is `flock` on a small lock file that records its owner (pid, host, command, start time). The kernel
releases it when the holder exits, however it dies (SIGKILL, OOM killer), so a lock is never stale: the next
command takes it and the owner record is rewritten. A second command is refused with a `LockHeld` error naming
the first. The lock file is removed on release, while still held, and `acquire` checks that the file it locked is
still the one at the path, so a command racing with a release never holds a lock on a deleted file.

    with locking.PathLock(locking.lock_path_for(out), target=out):   # `.OUT.lock` next to OUT
        ...                                                          # LockHeld if another process holds it

Forked children share the lock (they share the open file); exec'd children do not (the descriptor is
close-on-exec). On a filesystem without flock support the lock is skipped with a warning, never an error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class LockHeld(RuntimeError):
    """Another live process holds the lock; `owner` is its record (pid, host, command, started) or None."""

    def __init__(self, target: str, lock_path: str, owner: dict | None):
        self.target, self.lock_path, self.owner = target, lock_path, owner
        if owner:
            who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
                   f"{owner.get('command')}")
        else:
            who = "a process that has not recorded itself yet"
        super().__init__(f"{target} is in use by another process ({who}); wait for it to finish or stop it "
                         f"(lock file {lock_path}).")


def lock_path_for(target: str) -> str:
    """The lock file of `target`: the hidden sibling `.NAME.lock` (usable before `target` exists)."""
    target = os.path.abspath(target)
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")


def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join([sys.executable, *sys.argv]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _read_owner(lock_path: str) -> dict | None:
    for _ in range(20):  # the holder writes its record right after locking: give it a moment
        try:
            with open(lock_path) as f:
                text = f.read()
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


class PathLock:
    """An exclusive, non-blocking lock on `lock_path` guarding `target` (named in errors; default: lock_path).
    A context manager; `acquire()` raises LockHeld when another process holds it."""

    def __init__(self, lock_path: str, *, target: str | None = None):
        self.lock_path = os.path.abspath(lock_path)
        self.target = target or self.lock_path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> PathLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.lock_path} is already held by this object")
        os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise LockHeld(self.target, self.lock_path, _read_owner(self.lock_path)) from None
                if e.errno in _UNSUPPORTED:
                    print(f"warning: {self.lock_path}: this filesystem does not support locks ({e.strerror}); "
                          f"nothing stops a second process from using {self.target}", file=sys.stderr)
                    return self
                raise
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_owner_record()) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # while still held: a waiter re-checks the inode and retries
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def owner_of(lock_path: str) -> dict | None:
    """The record of the live process holding `lock_path`, or None when nobody holds it (never takes it for long:
    a probe that gets the lock releases it at once without removing the file)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _read_owner(lock_path) or {}
        return None
    finally:
        os.close(fd)
    return None
