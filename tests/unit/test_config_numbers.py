"""Numeric settings that cannot work stop the run at composition, naming the key and what it must be (exit 2 from
the entry point); a warmup longer than the run is allowed (short test runs of a preset) but noted at start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_mcore.training.config import ConfigError, compose

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, says", [
    ("optim.lr=-1", "must be a finite number >= 0"),
    ("optim.lr=nan", "must be a finite number >= 0"),
    ("optim.min_lr=-1e-5", ">= 0"),
    ("optim.weight_decay=-0.1", ">= 0"),
    ("optim.clip_grad=-1", ">= 0"),
    ("optim.vision_lr=-1", ">= 0"),
    ("optim.adam_eps=0", "above 0"),
    ("optim.adam_beta1=1.5", "[0, 1)"),
    ("optim.warmup_steps=-1", "0 or more"),
    ("optim.decay_steps=0", "at least 1"),
    ("checkpoint.every=-1", "0 or more (0 saves only at the end)"),
    ("trainer.eval_every=-5", "0 or more"),
    ("trainer.eval_batches=0", "at least 1"),
    ("trainer.steps=-3", "at least 1"),
    ("checkpoint.keep=0", "at least 1"),
    ("data.global_batch_size=-2", "at least 1"),
    ("data.valid_samples=-1", "0 or more"),
    ("data.num_workers=-1", "0 or more"),
    ("data.prefetch=0", "at least 1"),
    ("data.seed=-1", "0 or more"),
    ("data.frames_fps=0", "above 0"),
    ("data.image_max_pixels=0", "positive integer"),
    ("model.recompute_num_layers=0", "at least 1"),
    ("logging.peak_tflops=-1", "above 0"),
])
def test_impossible_numbers_fail_naming_the_key(override, says):
    with pytest.raises(ConfigError) as info:
        compose([override])
    key = override.split("=")[0]
    assert key in str(info.value) and says in str(info.value), str(info.value)


def test_schedule_bounds_fail_naming_the_fix():
    with pytest.raises(ConfigError, match=r"optim.min_lr=0.1 is above optim.lr=0.01.*lower optim.min_lr"):
        compose(["optim.lr=0.01", "optim.min_lr=0.1"])
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=10 is not shorter than optim.decay_steps=5"):
        compose(["optim.warmup_steps=10", "optim.decay_steps=5"])
    compose(["optim.schedule=constant", "optim.lr=0.01", "optim.min_lr=0.1"])  # min_lr unused by a constant LR


def test_zero_means_off_where_documented():
    cfg = compose(["checkpoint.every=0", "trainer.eval_every=0", "data.num_workers=0", "optim.warmup_steps=0",
                   "optim.lr=0", "optim.min_lr=0", "optim.clip_grad=0"])
    assert cfg.checkpoint.every == 0 and cfg.optim.lr == 0


def test_a_warmup_longer_than_the_run_is_noted():
    from qwenvl_mcore.training.config import config_notes

    notes = config_notes(compose(["trainer.steps=3", "optim.warmup_steps=10"]))
    assert len(notes) == 1 and "optim.warmup_steps=10" in notes[0] and "trainer.steps=3" in notes[0], notes
    assert config_notes(compose(["trainer.steps=30", "optim.warmup_steps=10"])) == []


def test_entry_point_exits_2_on_a_negative_learning_rate():
    proc = subprocess.run([sys.executable, "-m", "qwenvl_mcore.train", "optim.lr=-1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "optim.lr=-1.0: must be a finite number >= 0" in proc.stderr
