"""`python -m qwenvl_mcore.train` without torchrun runs as one rank (issue 16, item 13): before, it died with
"environment variable RANK expected"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                      "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def test_plain_python_trains_one_rank(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "qwenvl_mcore.train", "trainer.steps=1", "data.num_workers=0",
                           "data.global_batch_size=2", "optim.warmup_steps=0", "logging.progress_bar=false",
                           "logging.tensorboard=false", f"trainer.dir={run_dir}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " on 1 ranks, " in proc.stdout and "done at step 1" in proc.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000001"
