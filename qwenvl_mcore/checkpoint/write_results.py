"""The queue megatron's checkpoint writer reports through, served by a process that survives a stop signal.

megatron's torch_dist save (dist_checkpointing/strategies/filesystem_async.py) hands every write result through a
queue of a multiprocessing Manager, a separate server process started at the first save. It is started in the
trainer's process group with default signal handling, so the SIGUSR1 or SIGTERM that asks the run to stop
(torchrun passes it to each rank's whole process group; Slurm may signal every process) killed it, and the
checkpoint the trainer then wrote on that very signal failed with BrokenPipeError: a pre-empted run that had
already saved once lost its stop checkpoint and was not requeued.

:func:`install` starts that server up front with the stop signals ignored and tied to the trainer's life (SIGKILL
when the trainer dies, so it never outlives the run), and gives megatron its queue. This module is the only place
that changes megatron's checkpoint writing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_state: dict = {"manager": None}


def _serve_through_stops(parent_pid: int) -> None:
    """In the server process: ignore the run's stop signals (the trainer decides when to stop) and die with the
    trainer."""
    from qwenvl_mcore.parallel.spawn import die_with_parent

    for s in _STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    die_with_parent(parent_pid)


def install() -> None:
    """Give megatron's writer a results queue whose server ignores stop signals (idempotent; call before the
    first save, in the main thread)."""
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _state["manager"] is not None:
        return
    # spawn, as megatron's own default: the server holds no copy of the trainer (nor of its CUDA state)
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_serve_through_stops, initargs=(os.getpid(),))
    _state["manager"] = manager
    filesystem_async._results_queue = manager.Queue()


def server_pid() -> int | None:
    """The queue server's process id once installed (tests)."""
    manager = _state["manager"]
    return None if manager is None else manager._process.pid
