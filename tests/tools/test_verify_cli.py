"""tools/convert/verify.py on tiny checkpoints: its last line is JSON with logit parity within 1e-4 (fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from qwenvl_mcore.testing import tiny

    base = tmp_path_factory.mktemp("hf")
    return {layout: tiny.save_tiny_hf_checkpoint(base / layout, seed=7, expert_layout=layout)
            for layout in tiny.EXPERT_LAYOUTS}


def _verify(hf_dir, *flags):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert/verify.py"), "--hf", str(hf_dir), *flags],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("expert_layout, flags", [
    ("released", ("--tp", "2", "--ep", "2")),
    ("transformers5", ("--pp", "2")),
    ("released", ("--pp", "3", "--first-stage-layers", "2", "--last-stage-layers", "1")),
], ids=["tp2_ep2", "pp2", "pp3_uneven"])
def test_verify_reports_parity(checkpoints, expert_layout, flags):
    """Released and transformers-5 expert layouts, TP2/EP2, PP2 and uneven PP3 (2/1/1 of the 4 layers):
    max |dlogit| <= 1e-4, top-1 all equal."""
    report = _verify(checkpoints[expert_layout], *flags)
    assert report["max_abs_logit_diff"] <= 1e-4, report
    assert report["top1_agreement"] == 1.0 and report["logit_cosine"] > 0.99999, report
    if "--first-stage-layers" in flags:
        assert report["world_size"] == 3, report
        assert (report["layout"]["first_stage_layers"], report["layout"]["last_stage_layers"]) == (2, 1), report


def test_verify_refuses_an_uneven_split_that_does_not_add_up(checkpoints):
    """--pp 2 with 2 + 1 layers of the 4: exit 2 before any rank starts, naming both fields and the fix."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert/verify.py"), "--hf", str(checkpoints["released"]),
                           "--pp", "2", "--first-stage-layers", "2", "--last-stage-layers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel.first_stage_layers=2 and parallel.last_stage_layers=1 sum to 3" in proc.stderr
    assert "make them sum to 4" in proc.stderr


def test_verify_rejects_impossible_layout(checkpoints):
    """An impossible layout exits non-zero naming the field, before any rank starts."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert/verify.py"), "--hf",
                           str(checkpoints["released"]), "--ep", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "parallel.ep=3" in proc.stderr
