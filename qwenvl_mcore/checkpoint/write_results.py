"""Where megatron's checkpoint writer leaves its results: an in-process queue instead of a Manager process.

megatron's FileSystemWriterAsync hands each save's write results to the finalize step through a module-level
queue that its first save creates as `multiprocessing.Manager().Queue()`: a server process, started in the
trainer's process group and left running. A stop signal sent to that group (torchrun forwards a signal with
killpg; Slurm's linuxproc tracking signals every process of the step) kills the server, and the next save, the
stop checkpoint, fails with BrokenPipeError. Our saves are synchronous: the writer threads and the finalize step
run in the trainer process, so a plain `queue.Queue` carries the results with no process to lose. Async saves
(which would run the writer in another process) are not used by this project.

This is the only module that changes megatron's checkpoint writing; call `use_in_process_queue()` before a save.
"""

from __future__ import annotations

import queue


def use_in_process_queue() -> None:
    """Make megatron's write-results queue an in-process `queue.Queue` (idempotent; only for synchronous saves)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
