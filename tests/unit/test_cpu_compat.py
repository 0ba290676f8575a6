"""The CPU-compatibility layer, in a fresh process: each fix does what its docstring says, and nothing else."""

from __future__ import annotations

from qwenvl_mcore.testing.dist import run_on_ranks


def _probe(rank, world):
    import torch

    from qwenvl_mcore.parallel import cpu_compat

    assert cpu_compat.needed() and cpu_compat.apply() and cpu_compat.apply()  # idempotent
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outer_before = torch.rand(1)
    torch.manual_seed(0)
    with tracker.fork():
        forked_1 = torch.rand(3)
    outer_after = torch.rand(1)
    with tracker.fork():
        forked_2 = torch.rand(3)
    with cpu_compat.suspended_device_mode():
        suspended_type = torch.zeros(1).type()
    return {
        "suspended_type": suspended_type,
        "resumed_type": torch.zeros(1).type(),
        "cuda_tensor_on_cpu": torch.zeros(2, device="cuda").device.type,
        "current_device": torch.cuda.current_device(),
        "to_cuda": torch.ones(1).to("cuda").device.type,
        "type_names": [torch.zeros(1).type(), torch.zeros(1, dtype=torch.bfloat16).type()],
        "type_cast": torch.zeros(1).type(torch.float64).dtype == torch.float64,
        "synchronize": torch.cuda.synchronize() is None,
        "stream_wait": torch.cuda.current_stream().wait_event(None) is None,
        "fork_keeps_outer_stream": torch.equal(outer_before, outer_after),
        "fork_advances": not torch.equal(forked_1, forked_2),
    }


def test_cpu_compat_fixes():
    r = run_on_ranks(_probe, 1)[0]
    assert r["cuda_tensor_on_cpu"] == "cpu" and r["to_cuda"] == "cpu" and r["current_device"] == "cpu"
    assert r["type_names"] == ["torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor"]
    assert r["type_cast"] and r["synchronize"] and r["stream_wait"]
    assert r["fork_keeps_outer_stream"] and r["fork_advances"]
    # suspended_device_mode (host-overhead measurements): the mode is off inside and back on after
    assert r["suspended_type"] == "torch.FloatTensor" and r["resumed_type"] == "torch.cuda.FloatTensor"
