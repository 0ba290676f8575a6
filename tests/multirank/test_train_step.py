"""The training step (megatron DDP + distributed optimizer + per-token loss) learns a fixed batch at TP2/EP2/SP
and at PP2: the loss falls by at least half in 30 steps, every rank reports the same numbers, and data-parallel
replicas are identical at initialisation and stay so."""

from __future__ import annotations

import math

import pytest

from qwenvl_mcore.testing.dist import run_on_ranks

from _train_checks import overfit


@pytest.mark.parametrize("layout", [dict(tp=2, ep=2, sequence_parallel=True), dict(pp=2, ep=2)],
                         ids=["tp2_ep2_sp", "pp2_ep2"])
def test_loss_halves_in_30_steps(layout):
    results = run_on_ranks(overfit, 4, layout, 30)
    for r in results:
        assert not r["differ_at_init"] and not r["differ_at_end"], (r["differ_at_init"], r["differ_at_end"])
    steps = [r["steps"] for r in results]
    losses = [s["loss"] for s in steps[0]]
    assert all(math.isfinite(x) for x in losses) and not any(s["skipped"] for s in steps[0])
    assert losses[-1] <= 0.5 * losses[0], losses
    for other in steps[1:]:  # the loss and grad norm are global: identical on every rank
        assert [s["loss"] for s in other] == losses
        assert [s["grad_norm"] for s in other] == [s["grad_norm"] for s in steps[0]]
