"""Logit, loss, gradient and MRoPE parity with transformers' Qwen3VLMoeForConditionalGeneration at several layouts.

One multi-rank launch per layout runs every check (tests/multirank/_parity_checks.py); the tests assert on its numbers.
"""

from __future__ import annotations

import pytest

from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.dist import run_on_ranks

from _parity_checks import parity_checks

LAYOUTS = {
    "tp1_ep1": (1, dict()),
    "tp2_ep2_sp": (4, dict(tp=2, ep=2, sequence_parallel=True)),
    "tp1_ep4": (4, dict(ep=4)),
    "ep2_etp2": (4, dict(ep=2, etp=2)),
}
LOGIT_TOL, LOSS_TOL, GRAD_TOL = 1e-4, 1e-5, 1e-4


@pytest.fixture(scope="module", params=list(LAYOUTS))
def launch(request):
    world, layout = LAYOUTS[request.param]
    return request.param, run_on_ranks(parity_checks, world, layout, True)


def test_logits_and_loss_match_transformers(launch):
    """Every sample kind: max |dlogit| <= 1e-4 and |dloss| <= 1e-5 on every rank, top-1 identical."""
    name, results = launch
    for rank, result in enumerate(results):
        assert set(result["forward"]) == set(tiny.SAMPLE_KINDS)
        for kind, r in result["forward"].items():
            assert r["max_abs_logit_diff"] <= LOGIT_TOL, (name, rank, kind, r)
            assert r["loss_diff"] <= LOSS_TOL, (name, rank, kind, r)
            assert r["top1_agreement"] == 1.0, (name, rank, kind, r)


def test_mrope_position_ids_equal_transformers(launch):
    """Our position ids equal transformers' get_rope_index for every sample kind."""
    _, results = launch
    assert set(results[0]["rope"]) == set(tiny.SAMPLE_KINDS)
    assert all(results[0]["rope"].values()), results[0]["rope"]


def test_gradients_match_transformers(launch):
    """After one backward, every parameter's gradient (gathered to full HF tensors) matches within 1e-4 relative,
    with and without the load-balancing loss (coefficient 0.5, padded batch), whose value matches too."""
    name, results = launch
    for rank, result in enumerate(results):
        for key in ("grad", "grad_aux"):
            r = result[key]
            assert r["compared"] == 104 and not r["missing"], r
            assert r["max_rel_grad_diff"] <= GRAD_TOL, (name, rank, key, r)
        assert result["grad_aux"]["aux_loss_diff"] <= 1e-6, result["grad_aux"]
