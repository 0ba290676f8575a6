"""Start torch.distributed and megatron's parallel state from a validated ParallelLayout."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from qwenvl_mcore.parallel import cpu_compat
from qwenvl_mcore.parallel.layout import ParallelLayout


_PIPELINE_STATS_GROUP = None


def device() -> torch.device:
    """The device this rank computes on: its local GPU, or the CPU when there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def single_rank_environment() -> bool:
    """Started without torchrun (`python -m qwenvl_mcore.train`): neither RANK nor WORLD_SIZE is set, so run as the
    one rank of a one-rank world (RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1, a free MASTER_PORT;
    values already set are kept). Returns whether it did; a partial torchrun environment is left to torch."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from qwenvl_mcore.parallel.ports import free_port

        os.environ["MASTER_PORT"] = str(free_port(os.environ["MASTER_ADDR"]))
    return True


def init_distributed(layout: ParallelLayout, *, seed: int = 1234, timeout_s: int = 600) -> None:
    """Start the process group (nccl + gloo on GPU, gloo on CPU) and megatron's parallel state for `layout`.

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun or our test launcher) when the process group is not
    started yet; without them, one rank (:func:`single_rank_environment`). The layout is validated against the world
    size first.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        cpu_compat.apply()
    cpu_compat.apply_torch_adam_fix()
    if not dist.is_initialized():
        single_rank_environment()
        # On the GPU, NCCL for CUDA tensors and gloo for the small host-side reductions (token counts, routing
        # statistics, data-skip reports), which NCCL cannot take; megatron's groups inherit both.
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if on_gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    layout.validate(world_size=dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    # Parameters are initialised from torch's default generator (CPU initialisation) before being split: the same
    # seed on every rank of a pipeline stage keeps data-parallel replicas identical (megatron's DDP assumes it);
    # stages differ so that their layers do.
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    model_parallel_cuda_manual_seed(seed)
    global _PIPELINE_STATS_GROUP
    _PIPELINE_STATS_GROUP = _new_gloo_group_like(parallel_state.get_pipeline_model_parallel_group()) if layout.pp > 1 else None


def pipeline_stats_group():
    """A gloo group over this rank's pipeline stages (None without pipelining): the routers' statistics are summed
    over it asynchronously while the schedule's p2p traffic goes on in the pipeline group itself."""
    return _PIPELINE_STATS_GROUP


def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`dist.all_reduce` in place, skipped when `group` has one rank (then it is the identity; on a GPU it would
    still cost a launch and, on the CPU, a gloo round trip). Every rank of a group decides alike."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _new_gloo_group_like(group):
    """A gloo process group with the ranks of `group`; every rank creates every such group, in the same order."""
    mine = dist.get_process_group_ranks(group)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, tuple(mine))
    created = None
    for ranks in sorted(set(everyone)):
        g = dist.new_group(list(ranks), backend="gloo")
        if list(ranks) == mine:
            created = g
    return created


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    global _PIPELINE_STATS_GROUP
    _PIPELINE_STATS_GROUP = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
