"""checkpoint/locking.py: one holder at a time, the second refused naming the first, freed when the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from qwenvl_mcore.checkpoint import locking


def test_second_lock_is_refused_naming_the_first_and_free_after_release(tmp_path):
    target = tmp_path / "out"
    path = locking.lock_path_for(str(target))
    assert path == str(tmp_path / ".out.lock")
    with locking.PathLock(path, target=str(target)) as first:
        assert first.held and locking.owner_of(path)["pid"] == os.getpid()
        with pytest.raises(locking.LockHeld) as e:
            locking.PathLock(path, target=str(target)).acquire()
        assert e.value.owner["pid"] == os.getpid()
        assert str(target) in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert not os.path.exists(path) and locking.owner_of(path) is None
    with locking.PathLock(path):  # free again
        pass


def test_lock_of_a_killed_holder_is_free(tmp_path):
    path = str(tmp_path / ".run.lock")
    code = ("import sys, time; from qwenvl_mcore.checkpoint import locking; "
            f"l = locking.PathLock({path!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(locking.LockHeld, match=f"pid {proc.pid} on"):
            locking.PathLock(path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 5
    while locking.owner_of(path) is not None and time.time() < deadline:
        time.sleep(0.05)
    with locking.PathLock(path) as lock:  # the stale file is reused; the record is ours now
        assert lock.held and locking.owner_of(path)["pid"] == os.getpid()
