"""Run one function on N gloo ranks (CPU) and collect each rank's return value.

One launch serves many checks: the function runs all of them and returns a dict of results that pytest tests
then assert on. Exceptions on any rank are re-raised in the caller with the rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, kwargs: dict) -> None:
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


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args, **kwargs) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` spawned processes; return results by rank.

    `fn` must be importable (a module-level function). The process group is not started here: `fn` calls
    `qwenvl_mcore.parallel.init_distributed(layout)` with the layout it wants (the env vars are set).
    """
    with tempfile.TemporaryDirectory(prefix="qwenvl-ranks-") as out_dir:
        port = free_port()
        context = mp.start_processes(
            _worker, args=(world_size, port, out_dir, fn, args, kwargs), nprocs=world_size, join=False,
            start_method="spawn",
        )
        while not context.join():
            pass
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
