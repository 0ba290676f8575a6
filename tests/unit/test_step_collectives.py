"""The step's statistics join their collectives on every rank, whatever this rank's micro-batches held.

A rank whose micro-batches are all padding (its samples skipped as too long, say) records no load-balancing loss;
it used to return before the all-reduce the other ranks entered, and gloo aborted the job (a 2-rank EP2 run with
data.packing=false and too-long samples crashed in expert_load: "collective mismatch").
"""

from __future__ import annotations

from qwenvl_mcore.testing.dist import run_on_ranks


class _Routing:
    def __init__(self, values):
        self.values = values

    def aux_losses(self):
        return self.values


def _two_ranks(rank, world):
    import torch
    import torch.distributed as dist

    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from qwenvl_mcore.training.step import _mean_aux

    init_distributed(ParallelLayout(), seed=1, timeout_s=60)  # a mismatch fails in a minute, not hangs
    got = [_mean_aux(_Routing([] if rank == 0 else [1.0, 3.0]))]  # rank 0: padding only
    got.append(_mean_aux(_Routing([])))  # nobody has a value
    probe = torch.tensor([float(rank)])
    dist.all_reduce(probe)  # the ranks are still in step: the next collective matches
    return got + [float(probe)]


def test_mean_aux_joins_the_all_reduce_on_a_rank_without_values():
    results = run_on_ranks(_two_ranks, 2)
    assert results == [[2.0, None, 1.0], [2.0, None, 1.0]]


def test_reports_are_summed_on_the_device_with_one_host_read():
    """The step's loss sums (and evaluation's token counts) over micro-batches: Python's float64 sum of the
    micro-batches' values bit for bit, read on the host once rather than once per micro-batch."""
    import torch

    from qwenvl_mcore.testing.host_reads import HostReads
    from qwenvl_mcore.training.step import _summed_on_device

    g = torch.Generator().manual_seed(0)
    reports = [{"loss_sum": torch.rand((), generator=g) * 10 ** e, "tokens": torch.tensor(n, dtype=torch.int)}
               for e, n in ((2, 5), (-3, 0), (4, 7), (0, 3), (1, 11))]
    keys = ("loss_sum", "tokens")
    want = torch.tensor([sum(float(r[k]) for r in reports) for k in keys], dtype=torch.float64)
    with HostReads() as mode:
        got = _summed_on_device(reports, keys)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert mode.reads == ["cpu"]
    assert torch.equal(_summed_on_device([], keys), torch.zeros(2, dtype=torch.float64))
