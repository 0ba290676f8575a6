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


@pytest.mark.parametrize("expert_layout, flags", [("released", ("--tp", "2", "--ep", "2")),
                                                   ("transformers5", ("--pp", "2"))])
def test_verify_reports_parity(checkpoints, expert_layout, flags):
    """Released and transformers-5 expert layouts, TP2/EP2 and PP2: max |dlogit| <= 1e-4, top-1 all equal."""
    report = _verify(checkpoints[expert_layout], *flags)
    assert report["max_abs_logit_diff"] <= 1e-4, report
    assert report["top1_agreement"] == 1.0 and report["logit_cosine"] > 0.99999, report


def test_verify_rejects_impossible_layout(checkpoints):
    """An impossible layout exits non-zero naming the field, before any rank starts."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert/verify.py"), "--hf",
                           str(checkpoints["released"]), "--ep", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "parallel.ep=3" in proc.stderr
