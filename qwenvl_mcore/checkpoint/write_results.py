"""Where megatron's checkpoint writer leaves its results: never in a Manager process.

megatron's FileSystemWriterAsync hands each save's write results to the finalize step through a module-level
queue that its first save creates as `multiprocessing.Manager().Queue()`: a server process, started in the
trainer's process group and left running. A stop signal sent to that group (torchrun forwards a signal with
killpg; Slurm's linuxproc tracking signals every process of the step) kills the server, and the next save, the
stop checkpoint, fails with BrokenPipeError. So:

- synchronous saves (the writer threads and the finalize step run in the trainer process): a plain
  `queue.Queue` carries the results, with no process to lose (`use_in_process_queue`);
- asynchronous saves (checkpoint.async_save=true: megatron's TemporalAsyncCaller forks one writer process per
  save, which ends when its files are written): the writer leaves its results in a file of its own in the
  checkpoint's staging directory, which the finalize step reads and removes (`use_file_queue`). A file outlives
  any signal; a pipe-backed `multiprocessing.Queue` would not need a server either, but a writer with more results
  than the pipe holds would block at its exit while the trainer waits for that exit.

This is the only module that changes megatron's checkpoint writing; call one of the two before a save.
"""

from __future__ import annotations

import os
import pickle
import queue


class FileResultsQueue:
    """The two calls megatron makes on its results queue, `put` (in the writer, possibly a forked process) and
    `get_nowait` (in the finalize step, in the trainer), through one file. One save, one result: a second `put`
    replaces the first, as megatron puts exactly one per save and rank."""

    def __init__(self, path: str):
        self.path = path

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        try:
            data = pickle.dumps(item)
        except Exception as e:  # noqa: BLE001 - an unpicklable error still reaches the finalize step as one
            data = pickle.dumps(RuntimeError(f"checkpoint writer failed: {item!r} ({type(e).__name__}: {e})"))
        tmp = f"{self.path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def get_nowait(self):
        try:
            with open(self.path, "rb") as f:
                item = pickle.load(f)  # written by this rank's own writer into its own staging directory
        except FileNotFoundError:
            raise queue.Empty from None
        os.remove(self.path)
        return item

    def get(self, block: bool = True, timeout: float | None = None):
        return self.get_nowait()


def use_in_process_queue() -> None:
    """Make megatron's write-results queue an in-process `queue.Queue` (idempotent; only for synchronous saves)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def use_file_queue(path: str) -> FileResultsQueue:
    """Make megatron's write-results queue a file at `path` (one per save and rank, inside its staging directory),
    for a save whose writer runs in another process. The writer gets the queue when the save is planned, so the
    next save may set another one while this one is still being written."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = FileResultsQueue(path)
    return filesystem_async._results_queue
