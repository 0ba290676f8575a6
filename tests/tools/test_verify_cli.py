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


# ------------------------------------------------------------------------------------------------------------------
# --cp, --packed, --data (issue 19)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small clean messages-format dataset (images, two-image, video and image + video records)."""
    from qwenvl_mcore.data.sample_data import write_sample_dataset

    out = tmp_path_factory.mktemp("data")
    write_sample_dataset(out, num_samples=6, seed=0, formats=("messages",), image_sides=(32, 64), video_frames=(4, 6))
    return out / "messages.jsonl"


def _assert_sample_parity(report, samples):
    """Acceptance item 1 (fp32): logits within 1e-4, the loss and every sample's loss within 1e-4 relative."""
    assert report["max_abs_logit_diff"] <= 1e-4, report
    assert report["top1_agreement"] == 1.0 and report["logit_cosine"] > 0.99999, report
    assert report["loss_rel_diff"] <= 1e-4 and report["max_sample_loss_rel_diff"] <= 1e-4, report
    assert report["loss_tokens"] == report["ref_loss_tokens"] > 0, report  # every loss token counted once over CP
    assert report["samples"] == samples and report["rows"] == 1 and report["packed"] is True, report
    assert report["cp"] == 2 and report["layout"]["cp"] == 2, report


def test_verify_packed_built_in_samples_at_cp2(checkpoints):
    """--packed --cp 2: the built-in image + video, text, image and video samples packed into one row, split over 2
    CP ranks, each sample against transformers on it alone."""
    report = _verify(checkpoints["released"], "--packed", "--cp", "2")
    _assert_sample_parity(report, 4)
    assert report["world_size"] == 2, report


def test_verify_dataset_records_packed_at_cp2_tp2(checkpoints, dataset):
    """--data FILE --samples 4 --packed --cp 2 --tp 2: the dataset's first 4 records, rendered as training renders
    them, packed into one row over CP2 x TP2 (sequence parallel, 4 ranks)."""
    report = _verify(checkpoints["transformers5"], "--data", str(dataset), "--samples", "4", "--packed", "--cp", "2",
                     "--tp", "2")
    _assert_sample_parity(report, 4)
    assert report["world_size"] == 4 and report["layout"]["sequence_parallel"] is True, report
    assert report["data"] == str(dataset), report


def test_verify_refuses_bad_input(checkpoints, tmp_path):
    """A --cp that does not divide --ranks, a --data file that does not exist or holds no usable record: exit 2
    before any rank starts, naming the fix."""
    def run(*flags):
        return subprocess.run([sys.executable, str(ROOT / "tools/convert/verify.py"), "--hf",
                               str(checkpoints["released"]), *flags], capture_output=True, text=True, timeout=120)

    ranks = run("--cp", "2", "--ranks", "3")
    assert ranks.returncode == 2, ranks.stderr[-2000:]
    assert "world size 3 is not divisible by tp*pp*cp = 1*1*2" in ranks.stderr
    assert "leave --ranks out to start the 2 the layout needs" in ranks.stderr
    missing = run("--data", str(tmp_path / "nope.jsonl"), "--cp", "2")
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert f"--data {tmp_path / 'nope.jsonl'} does not exist" in missing.stderr
    assert "give a JSONL (messages, ShareGPT or OpenAI format) or parquet dataset file" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "narrator", "content": "hi"}]}\nnot json\n', encoding="utf-8")
    unusable = run("--data", str(bad), "--packed")
    assert unusable.returncode == 2, unusable.stderr[-2000:]
    assert f"--data {bad} has no usable record (2 skipped" in unusable.stderr
    assert "fix the records" in unusable.stderr
