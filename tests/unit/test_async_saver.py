"""manager.AsyncSaver on 2 gloo ranks with a small sharded state (the trainer's use is in
tests/multirank/test_async_save.py): `latest` moves only when the write is finalized on every rank; what is written
is the state when the save started, whatever training does to it meanwhile; a write failing on one rank (ENOSPC)
raises on every rank, removes the partial directory and leaves `latest`; an aborted save publishes nothing; no
Manager process is ever started."""

from __future__ import annotations

import errno
import os
import shutil

import torch

from qwenvl_mcore.testing.dist import run_on_ranks


def _checks(rank: int, world: int, work: str) -> dict:
    import psutil
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from qwenvl_mcore.checkpoint import manager, model_io
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    root, hold, hf = (os.path.join(work, n) for n in ("ckpt", "hold", "hf"))
    if rank == 0:
        os.makedirs(hold)
        os.makedirs(hf)
    dist.barrier()
    os.environ[manager.HOLD_ENV] = hold
    weight = torch.arange(8.0).reshape(2, 4) + 10 * rank  # each rank holds one row block of a (4, 4) tensor

    def state():
        return {"w": ShardedTensor.from_rank_offsets("w", weight, (0, rank, world))}

    def latest():
        return open(os.path.join(root, "latest")).read().strip() if os.path.exists(os.path.join(root, "latest")) else None

    def release(name):
        if rank == 0:
            open(os.path.join(hold, name), "w").close()

    def saved(step):
        loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(2, 4),
                                                                               (0, rank, world))},
                                         os.path.join(root, f"step_{step:07d}"))
        return loaded["w"].tolist()

    saver, out = manager.AsyncSaver(), {}
    before = weight.clone()
    path = saver.save(root, 1, state(), hf_dir=hf, dtype=torch.float32, keep=5)
    weight.add_(100.0)  # training goes on while step 1 is written (held)
    saver.poll()
    out["latest_while_held"] = latest()
    out["pending"] = os.path.basename(saver.pending or "")
    out["staging_exists"] = os.path.isdir(model_io.staging_dir_for(path))
    out["children"] = len(psutil.Process().children(recursive=True))  # the writer only: no Manager process
    release("release_1")
    saver.wait()
    out["latest_after"] = latest()
    out["step1_is_the_state_at_save"] = saved(1) == before.tolist()
    out["no_results_file_left"] = not [n for n in os.listdir(path) if n.startswith(".write_results")]

    # a write failing on rank 1 (its writer process inherits the failing function), on a disk that reports itself full
    real, real_usage = filesystem_async._write_item, shutil.disk_usage
    shutil.disk_usage = lambda path: type(real_usage(path))(10 * 2**30, 10 * 2**30, 0)
    if rank == 1:
        def failing(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        filesystem_async._write_item = failing
    release("release_2")
    saver.save(root, 2, state(), hf_dir=hf, dtype=torch.float32, keep=5)
    try:
        saver.wait()
        out["failure"] = None
    except model_io.CheckpointError as e:
        out["failure"] = str(e)
    filesystem_async._write_item, shutil.disk_usage = real, real_usage
    dist.barrier()
    out["latest_after_failure"] = latest()
    out["listing_after_failure"] = sorted(os.listdir(root))

    # an aborted save (the trainer failing on the way out) publishes nothing
    saver.save(root, 3, state(), hf_dir=hf, dtype=torch.float32, keep=5)
    saver.abort()
    dist.barrier()
    out["latest_after_abort"] = latest()
    out["listing_after_abort"] = sorted(os.listdir(root))
    out["children_after_abort"] = len([p for p in psutil.Process().children(recursive=True) if p.is_running()
                                       and p.status() != psutil.STATUS_ZOMBIE])
    return out


def test_async_saver(tmp_path):
    results = run_on_ranks(_checks, 2, str(tmp_path))
    for r in results:
        assert r["latest_while_held"] is None and r["pending"] == "step_0000001"
        assert r["children"] == 1
        assert r["latest_after"] == "step_0000001" and r["step1_is_the_state_at_save"]
        assert r["failure"] is not None and "ENOSPC" in r["failure"] and ".step_0000002.incomplete" in r["failure"]
        assert r["latest_after_failure"] == "step_0000001"
        assert r["latest_after_abort"] == "step_0000001" and r["children_after_abort"] == 0
    assert results[0]["staging_exists"] and results[0]["no_results_file_left"]
    assert results[0]["listing_after_failure"] == ["latest", "step_0000001"]
    assert results[0]["listing_after_abort"] == ["latest", "step_0000001"]
