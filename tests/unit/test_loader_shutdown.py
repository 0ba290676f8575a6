"""DataLoader workers never keep a failing trainer alive (issue 16, item 1): they ignore SIGTERM (Slurm signals every
process; the trainer checkpoints first), so the loader ends them itself: StepLoader.close() kills busy workers at
once, and a loader left open (an uncaught exception whose traceback keeps the iterator alive) is closed at exit
instead of being waited for forever by multiprocessing's exit handler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.pipeline import BatchShape, StepBatches, step_loader
from qwenvl_mcore.data.sampler import GlobalBatchSampler

ROOT = Path(__file__).resolve().parents[2]
SHAPE = BatchShape(seq_length=64, packing=True, micro_batch_size=1, pad_token_id=0, image_token_id=1,
                   video_token_id=2, vision_start_token_id=3, vision_end_token_id=4, spatial_merge_size=2)


class Slow:
    """Every entry takes 10 minutes to render (a worker busy decoding)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        time.sleep(600)


class Strict:
    """Entry 1 is bad in strict mode."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        raise DataError(f"data.strict=true: bad_json at data.jsonl:{i + 1}: invalid JSON")


def _steps(dataset) -> StepBatches:
    return StepBatches(dataset, GlobalBatchSampler(len(dataset), 2, seed=0, shuffle=False), SHAPE, dp_rank=0,
                       dp_size=1)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_close_kills_busy_workers_that_ignore_sigterm():
    before = {c.pid for c in psutil.Process().children()}  # earlier tests of the session may have left some
    loader = step_loader(_steps(Slow()), 0, num_workers=2, prefetch=1)
    pids = loader.worker_pids()
    assert sorted(pids) == sorted({c.pid for c in psutil.Process().children()} - before)
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    time.sleep(1.0)  # both are now inside a 10-minute __getitem__
    os.kill(pids[0], signal.SIGTERM)  # what Slurm sends every process: the worker stays (pre-emption checkpoints)
    time.sleep(0.5)
    assert _alive(pids[0])
    start = time.monotonic()
    loader.close()
    assert time.monotonic() - start < 5.0
    assert not any(_alive(p) for p in pids)
    loader.close()  # twice is fine


def test_a_worker_data_error_comes_back_with_its_own_message():
    loader = step_loader(_steps(Strict()), 0, num_workers=1, prefetch=1)
    try:
        try:
            next(loader)
            raise AssertionError("no DataError")
        except DataError as e:
            assert str(e) == "data.strict=true: bad_json at data.jsonl:1: invalid JSON"  # no worker traceback
    finally:
        loader.close()


def test_an_uncaught_error_with_workers_running_exits():
    """A process that dies of an uncaught exception while its loader's workers are busy exits at once, with
    Python's status 1 (the traceback keeps the loader alive until after multiprocessing's exit handler)."""
    script = textwrap.dedent("""
        import sys
        import psutil
        sys.path.insert(0, sys.argv[1])
        from test_loader_shutdown import Slow, _steps
        from qwenvl_mcore.data.pipeline import step_loader

        def run():
            loader = step_loader(_steps(Slow()), 0, num_workers=2, prefetch=1)
            print("workers", *[c.pid for c in psutil.Process().children()], flush=True)
            raise RuntimeError("boom")

        run()
    """)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            out, err = proc.communicate()
        for line in (out or "").splitlines():
            if line.startswith("workers "):
                for pid in map(int, line.split()[1:]):
                    if _alive(pid):
                        os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert "RuntimeError: boom" in err
    assert time.monotonic() - start < 60
    pids = [int(p) for line in out.splitlines() if line.startswith("workers ") for p in line.split()[1:]]
    assert len(pids) == 2 and not any(_alive(p) for p in pids)
