"""Process lifetime: a helper process that must not outlive the one that started it.

Dependency-free (the standard library only), so that slurm/rank.py and slurm/torchrun.py can use it before
anything heavy is imported.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent exits (Linux PR_SET_PDEATHSIG; elsewhere a no-op); exit now if the
    parent is already gone (it may have died before this call). The kernel ties this to the thread that spawned us:
    spawn from the main thread."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)
