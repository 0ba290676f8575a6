"""The GPU benchmarks run end to end at a CPU size, so they cannot rot between GPU sessions: the experts benchmark's
grouped GEMM equals its loop, and the train-step benchmark's model gives transformers' first-step loss on the same
weights and packed batch (its exit status checks that too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, script: str, *args: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, f"tools/bench/{script}", *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith(("|", "speedup")), proc.stdout[-2000:]
    return json.loads(out.read_text())


def test_experts_benchmark_grouped_equals_loop(tmp_path):
    result = _run(tmp_path, "experts.py", "--shape", "tiny", "--iters", "1", "--warmup", "1")
    rows = result["results"]
    assert [r["impl"] for r in rows] == ["grouped", "loop"]
    for r in rows:
        assert r["rel_diff_grouped_vs_loop"] < 1e-6
        assert r["rows"] == 16 * 512 and r["layer_fwd_bwd_tflops"] > 0


def test_train_step_benchmark_matches_transformers(tmp_path):
    result = _run(tmp_path, "train_step.py", "--flavor", "debug", "--layers", "0", "--seq-length", "256",
                  "--samples-per-row", "2", "--image-side", "8", "--microbatches", "2", "--steps", "1",
                  "--warmup", "1")
    assert result["first_loss_rel_diff"] < 1e-4
    assert result["ours"]["tokens_per_s"] > 0 and result["transformers"]["tokens_per_s"] > 0
    assert result["flops"]["tokens"] == 2 * 256 and result["flops"]["vision"] > 0
    assert set(result["ours"]["parts_s"]) == {"decoder", "lm_head", "vision"}


def test_host_overhead_benchmark_runs():
    proc = subprocess.run([sys.executable, "tools/bench/host_overhead.py", "--vit-depth", "2", "--layers", "1",
                           "--iters", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| vision", "| decoder"))]
    assert len(rows) == 4
    for row in rows:
        calls = int(row.split("|")[3])
        assert calls > 50, row
