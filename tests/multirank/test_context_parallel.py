"""Context parallelism on gloo ranks: the attention (all-gather of K/V, reduce-scatter of dK/dV) against full-row
attention at CP2 and CP4."""

from __future__ import annotations

import pytest

from qwenvl_mcore.testing.dist import run_on_ranks

from _context_parallel_checks import ATTENTION_ROWS, attention_checks


@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_forward_backward_equal_full_row(world):
    """Packed rows with odd samples, a sample shorter than 2*cp and trailing padding: every rank's output and its
    dq, dk, dv equal full-row segment attention's at its positions within 1e-12 (fp64)."""
    results = run_on_ranks(attention_checks, world)
    for rank, per_row in enumerate(results):
        assert len(per_row) == len(ATTENTION_ROWS)
        for row, d in zip(ATTENTION_ROWS, per_row):
            for key in ("out", "dq", "dk", "dv"):
                assert d[key] <= 1e-12, (world, rank, row, d)
            assert d["padding_grad_zero"], (world, rank, row, d)
