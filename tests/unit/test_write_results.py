"""checkpoint/write_results.py: megatron's write-results queue is served by a process that a stop signal does not
kill (the stop checkpoint needs it) and that never outlives the trainer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from qwenvl_mcore.checkpoint import write_results
    write_results.install()
    write_results.install()  # idempotent
    pid = write_results.server_pid()
    print(pid, flush=True)
    for s in (signal.SIGUSR1, signal.SIGTERM):  # what torchrun / Slurm send the rank's process group
        os.kill(pid, s)
    time.sleep(0.5)
    queue = filesystem_async.get_write_results_queue()
    queue.put({"ok": 1})
    assert queue.get_nowait() == {"ok": 1}
    print("served", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the trainer dies without any cleanup
""")


def test_server_survives_stop_signals_and_dies_with_the_trainer():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180)
    lines = proc.stdout.split()
    assert proc.returncode == -signal.SIGKILL and lines[1:] == ["served"], proc.stdout + proc.stderr[-3000:]
    server = int(lines[0])
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if psutil.Process(server).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        os.kill(server, signal.SIGKILL)
        raise AssertionError(f"the queue server {server} outlived its trainer")
