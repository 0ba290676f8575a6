"""Run one function on N spawned local processes (ranks) and collect each rank's return value.

Used by the converters to split their work and by the tests to run multi-rank checks on CPU (gloo). The workers
never outlive the caller: each asks the kernel to SIGKILL it when its parent dies (Linux PR_SET_PDEATHSIG, so a
SIGKILLed or OOM-killed caller leaves no orphan writing its output), and a caller stopped by SIGTERM (scancel,
timeout) or any exception stops its workers before the exception propagates (SIGTERM becomes SystemExit(143)).
Exceptions on any rank are re-raised in the caller as RankError with the rank's traceback.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from qwenvl_mcore.lifetime import die_with_parent
from qwenvl_mcore.parallel.ports import free_port

SIGTERM_EXIT_CODE = 143


def _worker(rank: int, world_size: int, port: int, out_dir: str, parent_pid: int, fn: Callable, args: tuple,
            kwargs: dict) -> None:
    die_with_parent(parent_pid)
    from qwenvl_mcore import library_noise

    library_noise.install()  # a spawned interpreter starts afresh: keep the libraries' known notices off again
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Two cores are shared by all ranks: more intra-op threads per rank only adds contention.
    import torch

    torch.set_num_threads(1)
    try:
        result = ("ok", fn(rank, world_size, *args, **kwargs))
    except BaseException:  # noqa: BLE001 - the parent re-raises with this traceback
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        from qwenvl_mcore.parallel.distributed import destroy_distributed

        destroy_distributed()
    except Exception:  # noqa: BLE001 - teardown after the result is saved must not mask it
        pass


class RankError(RuntimeError):
    """A function failed on one or more ranks."""


def _raise_exit(signum, frame):
    raise SystemExit(SIGTERM_EXIT_CODE)


@contextlib.contextmanager
def sigterm_as_exit():
    """Within the block (main thread only), SIGTERM raises SystemExit(143) so that cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_processes(processes, grace_s: float = 5.0) -> None:
    """SIGTERM every live process, SIGKILL those still alive after `grace_s`, and reap them all."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + grace_s
    for p in processes:
        p.join(max(deadline - time.time(), 0))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args, **kwargs) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` spawned processes; return results by rank.

    `fn` must be importable (a module-level function). The process group is not started here: `fn` calls
    `qwenvl_mcore.parallel.init_distributed(layout)` with the layout it wants (the env vars are set).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="qwenvl-ranks-") as out_dir, sigterm_as_exit():
        port = free_port()
        context = mp.start_processes(
            _worker, args=(world_size, port, out_dir, os.getpid(), fn, args, kwargs), nprocs=world_size,
            join=False, start_method="spawn",
        )
        try:
            while not context.join():
                pass
        except BaseException:
            stop_processes(context.processes)
            raise
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result (process died)")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                results.append(None)
            else:
                results.append(value)
        if errors:
            raise RankError("\n".join(errors))
        return results
