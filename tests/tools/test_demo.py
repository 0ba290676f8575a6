"""The README's main job (`make demo` = `python -m qwenvl_mcore.demo`) end to end at reduced size: tiny HF model and
sample dataset made locally, conversion, training at TP2 x EP2 on 4 CPU ranks through launch/local.sh, export,
generation in transformers, summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_main_job_at_reduced_size(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "qwenvl_mcore.demo", "--out", str(out), "--steps", "4",
                           "--samples", "12"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[demo]")]
    assert any("transformers loads the export and answers" in line for line in lines), lines
    summary = next(line for line in lines if line.startswith("[demo] loss"))
    assert "over 4 steps" in summary and "tokens/s" in summary
    metrics = [json.loads(x) for x in (out / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4] and train[-1]["loss"] < train[0]["loss"]
    checkpoints = out / "run" / "checkpoints"
    config = (checkpoints / (checkpoints / "latest").read_text().strip() / "config.yaml").read_text()
    assert "tp: 2" in config and "ep: 2" in config and str(out / "data") in config
    assert (out / "export" / "config.json").exists() and list((out / "export").glob("*.safetensors"))
