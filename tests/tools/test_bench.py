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


def test_host_overhead_benchmark_runs(tmp_path):
    """The parts table and the whole-step comparison at the smallest size; the last line is the step's JSON."""
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, "tools/bench/host_overhead.py", "--parts", "--vit-depth", "2", "--layers",
                           "1", "--seq-length", "128", "--microbatches", "1", "--iters", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| vision", "| decoder"))]
    assert len(rows) == 4
    for row in rows:
        calls = int(row.split("|")[3])
        assert calls > 50, row
    last = json.loads(proc.stdout.rstrip().splitlines()[-1])
    assert set(last) == {"ours", "transformers"}
    for side in last.values():
        assert set(side) == {"aten_calls", "host_syncs", "host_ms"}
        assert side["aten_calls"] > 100 and side["host_syncs"] > 0 and side["host_ms"] > 0
    details = json.loads(out.read_text())
    for name in ("ours", "transformers"):
        assert sum(details[name]["syncs_by_op"].values()) == last[name]["host_syncs"]
        assert details[name]["aten_calls"] == last[name]["aten_calls"]
        assert sum(details[name]["aten_calls_by_phase"].values()) == last[name]["aten_calls"]
        assert sum(details[name]["host_syncs_by_phase"].values()) == last[name]["host_syncs"]
        assert details[name]["aten_calls_by_phase"]["optimizer"] > 0
    assert details["config"]["llm_layers"] == 1 and details["config"]["vit_depth"] == 2


def test_sync_counter_counts_what_would_sync_on_a_gpu():
    """The counting modes on tiny functions: reads of device-resident tensors count, host-resident ones do not."""
    sys.path.insert(0, str(ROOT / "tools" / "bench"))
    import torch
    from host_overhead import SyncCounter

    x = torch.arange(6.0)  # made before counting: device-resident (a parameter, a batch on the GPU)
    ids = torch.arange(6)  # passed as host-resident (token ids kept on the host)

    def f():
        x[0].item()
        x[1].item()
        torch.nonzero(x)

    with SyncCounter() as c:
        f()
    assert c.host_syncs == 3 and dict(c.syncs) == {"item": 2, "nonzero": 1}
    assert c.aten_calls >= 3

    with SyncCounter(host=[ids]) as c:
        ids.tolist()
        (ids + 1)[ids > 2].sum().item()  # derived from host tensors only: no sync
        torch.zeros(3).tolist()  # a factory without device=: host
        x.tolist()
        x.cpu()
        bool(x[2] > 1)
        torch.tensor([x[0], x[1]])  # one read per device element
        x[x > 2]  # boolean mask: the size is read back
        torch.repeat_interleave(x.long())
        torch.repeat_interleave(x.long(), output_size=15)  # size given: no sync
        h = torch.zeros(6)
        h.copy_(x)  # device to host
        torch.zeros(2, device=ids.device).tolist()  # made where a host tensor lives: host
        torch.zeros(2, device=x.device).sum().item()  # made where a device tensor lives, then read back
    assert dict(c.syncs) == {"tolist": 1, "cpu": 1, "bool": 1, "torch.tensor(list of tensors)": 2,
                             "boolean-mask indexing": 1, "repeat_interleave": 1, "copy_ device to host": 1,
                             "item": 1}, dict(c.syncs)
    assert c.host_syncs == 9
