"""Rank functions for the trainer's checkpoint and run-directory checks (tests/multirank/test_trainer_guards.py,
issue 16 items 5-9 and 11), run in the guard launch (DP2) after its other checks: each one returns what it saw
(statuses, error messages, files present) and the tests assert on it."""

from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
import socket
import time
import traceback
from collections import namedtuple

import torch
import torch.distributed as dist

from qwenvl_mcore.training import trainer

from _guard_checks import ckpt_dir, compose, train_records

EXTRA = ["checkpoint.keep=10"]
_DiskUsage = namedtuple("usage", "total used free")


class Payload:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _error(fn) -> str | None:
    """The message of the CheckpointError / ConfigError `fn` raises (None if it returns), with its type."""
    try:
        fn()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - the test asserts on type and text (DCP's errors are BaseExceptions)
        return f"{type(e).__name__}: {e}"
    return None


def _sync() -> None:
    dist.barrier()


def _copy_run(src_run: str, dst_run: str, steps: list[int], latest: int) -> str:
    root = os.path.join(dst_run, "checkpoints")
    os.makedirs(root)
    for s in steps:
        shutil.copytree(ckpt_dir(src_run, s), os.path.join(root, f"step_{s:07d}"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"step_{latest:07d}\n")
    return root


def _listing(run_dir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def checkpoint_checks(rank: int, work: str, init: str) -> dict:
    """Items 6, 11, 8, 7, 9 and 5 on one base run, each step's failure returned as "ck_<step>_error" (the later
    steps still run)."""
    out = {}
    base = os.path.join(work, "ck_base")
    for name, step in (("lock", _lock_step), ("base", _base_step), ("finished", _finished_step),
                       ("fresh", _fresh_step), ("damaged", _damaged_step), ("enospc", _enospc_step),
                       ("unsafe", _unsafe_checks)):
        start = time.perf_counter()
        try:
            out.update(step(rank, work, init, base))
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - the test fails on it and shows the traceback (DCP's BaseExceptions too)
            out[f"ck_{name}_error"] = traceback.format_exc()
        out[f"ck_{name}_seconds"] = time.perf_counter() - start
    return out


def _run(run_dir: str, init: str, steps: int, extra=()) -> str:
    return trainer.train(compose(run_dir, steps, 8, [f"model.init_from={init}", *EXTRA, *extra]))


def _lock_step(rank: int, work: str, init: str, base: str) -> dict:
    """6. A second run on a trainer.dir in use is refused on every rank, naming the holder; nothing is written."""
    from qwenvl_mcore.checkpoint import locking

    out = {}
    busy = os.path.join(work, "ck_busy")
    holder = None
    if rank == 0:
        holder = locking.PathLock(locking.lock_path_for(busy), target=busy).acquire()
    try:
        out["lock_error"] = _error(lambda: _run(busy, init, 1))
    finally:
        if holder:
            holder.release()
    out["lock_pid"], out["lock_host"] = os.getpid(), socket.gethostname()
    out["lock_wrote"] = os.path.exists(os.path.join(busy, "logs", "metrics.jsonl"))
    return out


def _base_step(rank: int, work: str, init: str, base: str) -> dict:
    """11. Leftovers of killed saves under checkpoint.dir are removed at the start; other names are kept."""
    if rank == 0:
        root = os.path.join(base, "checkpoints")
        for name in (".step_0000007.incomplete", ".step_0000001.old-123-0a1b2c3d", ".step_keep.incomplete",
                     "notes"):
            os.makedirs(os.path.join(root, name, "sub"), exist_ok=True)
    _sync()
    out = {"base_status": _run(base, init, 2, ["checkpoint.every=1"])}
    out["base_listing"] = _listing(base) if rank == 0 else None
    return out


def _finished_step(rank: int, work: str, init: str, base: str) -> dict:
    """8. Run again when finished: exit at once, no save (files untouched), no step logged."""
    out = {}
    md = os.path.join(ckpt_dir(base, 2), ".metadata")
    before = (os.stat(md).st_ino, os.stat(md).st_mtime_ns, len(train_records(base)))
    _sync()
    out["finished_status"] = _run(base, init, 2)
    out["finished_same"] = (os.stat(md).st_ino, os.stat(md).st_mtime_ns, len(train_records(base))) == before
    return out


def _fresh_step(rank: int, work: str, init: str, base: str) -> dict:
    """8. A save replacing the step directory `latest` names (a fresh start, checkpoint.resume=false, in a directory
    holding steps 1-2): after every rename of the save, `latest` names an existing directory."""
    out = {}
    fresh = os.path.join(work, "ck_fresh")
    if rank == 0:
        _copy_run(base, fresh, [1, 2], 2)
    _sync()
    seen = []
    real_rename = os.rename

    def watching_rename(src, dst):
        real_rename(src, dst)
        latest = os.path.join(fresh, "checkpoints", "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                named = f.read().strip()
            seen.append((os.path.basename(dst), named, os.path.isdir(os.path.join(fresh, "checkpoints", named))))

    os.rename = watching_rename
    try:
        out["fresh_status"] = _run(fresh, init, 2, ["checkpoint.resume=false"])
    finally:
        os.rename = real_rename
    if rank == 0:
        out["fresh_renames"] = seen
        with open(os.path.join(fresh, "checkpoints", "latest")) as f:
            out["fresh_latest"] = f.read().strip()
    return out


def _damaged_step(rank: int, work: str, init: str, base: str) -> dict:
    """7. A damaged newest checkpoint: an error naming the file and checkpoint.fallback=true; with it, the run
    resumes from the newest intact one."""
    out = {}
    for kind in ("truncated", "garbage"):
        damaged = os.path.join(work, f"ck_{kind}")
        if rank == 0:
            _copy_run(base, damaged, [1, 2], 2)
            if kind == "truncated":
                os.truncate(os.path.join(ckpt_dir(damaged, 2), "__0_0.distcp"), 1000)
            else:
                with open(os.path.join(ckpt_dir(damaged, 2), ".metadata"), "wb") as f:
                    f.write(b"not a pickle\n" * 10)
        _sync()
        out[f"{kind}_error"] = _error(lambda: _run(damaged, init, 3))
    out["fallback_status"] = _run(damaged, init, 3, ["checkpoint.fallback=true"])
    if rank == 0:
        out["fallback_steps"] = [r["step"] for r in train_records(damaged)]
        out["fallback_listing"] = _listing(damaged)
    return out


def _enospc_step(rank: int, work: str, init: str, base: str) -> dict:
    """9. Out of disk during a save: rank 1's writer fails with ENOSPC and the filesystem reports no free space;
    every rank gets the error naming ENOSPC and the directory, and the partial directory is removed."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    out = {}
    full = os.path.join(work, "ck_full")
    real_write, real_usage = filesystem_async._write_item, shutil.disk_usage

    def failing_write(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if rank == 1:
        filesystem_async._write_item = failing_write
    shutil.disk_usage = lambda path: _DiskUsage(10 * 2**30, 10 * 2**30, 0)
    try:
        out["enospc_error"] = _error(lambda: _run(full, init, 1))
    finally:
        filesystem_async._write_item, shutil.disk_usage = real_write, real_usage
    _sync()
    if rank == 0:
        out["enospc_listing"] = sorted(os.listdir(os.path.join(full, "checkpoints")))
    return out


def _craft_object(ckpt: str, key_prefix: str, payload) -> None:
    """Replace every stored bytes object whose key starts with `key_prefix` by a torch.save of `payload` in a new
    data file (the metadata, rewritten, points at it)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        md = pickle.load(f)
    buf = io.BytesIO()
    torch.save({"state": payload}, buf)
    with open(os.path.join(ckpt, "__crafted.distcp"), "wb") as f:
        f.write(buf.getvalue())
    hits = [i for i in md.storage_data if i.fqn.startswith(key_prefix)]
    assert hits, key_prefix
    for index in hits:
        md.storage_data[index] = _StorageInfo("__crafted.distcp", 0, len(buf.getvalue()))
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def _unsafe_checks(rank: int, work: str, init: str, base: str) -> dict:
    """5. Crafted pickles whose loading would create a marker file: a converted checkpoint's .metadata (through
    model.init_from), and in the checkpoint a run resumes from: its .metadata, a legacy common.pt, the RNG
    ShardedObjects. Each is refused on every rank with a CheckpointError naming the file; no marker appears."""
    out = {}
    markers = {k: os.path.join(work, f"PWNED_{k}") for k in ("init_metadata", "metadata", "common", "rng")}
    evil_init = os.path.join(work, "evil_init")
    runs = {k: os.path.join(work, f"evil_{k}") for k in ("metadata", "common", "rng")}
    if rank == 0:
        shutil.copytree(init, evil_init)
        with open(os.path.join(evil_init, ".metadata"), "wb") as f:
            pickle.dump(Payload(markers["init_metadata"]), f)
        for kind, run_dir in runs.items():
            root = _copy_run(base, run_dir, [2], 2)
            ckpt = os.path.join(root, "step_0000002")
            if kind == "metadata":
                with open(os.path.join(ckpt, ".metadata"), "wb") as f:
                    pickle.dump(Payload(markers["metadata"]), f)
            elif kind == "common":
                torch.save(Payload(markers["common"]), os.path.join(ckpt, "common.pt"))
            else:
                _craft_object(ckpt, "rng_state/", Payload(markers["rng"]))
    _sync()
    out["unsafe_errors"] = {
        "init_metadata": _error(lambda: trainer.train(compose(os.path.join(work, "evil_init_run"), 3, 8, [
            f"model.init_from={evil_init}"]))),
        **{k: _error(lambda run_dir=run_dir: trainer.train(compose(run_dir, 3, 8, [f"model.init_from={init}"])))
           for k, run_dir in runs.items()},
    }
    _sync()
    out["unsafe_markers"] = sorted(k for k, m in markers.items() if os.path.exists(m))
    return out
