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
    """Also: the parts with and without DDP's gradient accumulation give the same weight gradients, the step's
    syncs and aten calls are counted, and the profile's device figures are null without a device."""
    result = _run(tmp_path, "train_step.py", "--flavor", "debug", "--layers", "0", "--seq-length", "256",
                  "--samples-per-row", "2", "--image-side", "8", "--microbatches", "2", "--steps", "1",
                  "--warmup", "1", "--check-parts", "--profile", str(tmp_path / "prof"))
    assert result["first_loss_rel_diff"] < 1e-4 and result["first_loss_limit"] == 1e-4
    assert result["ours"]["tokens_per_s"] > 0 and result["transformers"]["tokens_per_s"] > 0
    ratio = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    assert abs(result["speedup"] - ratio) < 1e-12 * ratio
    assert result["flops"]["tokens"] == 2 * 256 and result["flops"]["vision"] > 0
    ours = result["ours"]
    parts = {"decoder", "lm_head", "vision"}
    for key in ("parts_s", "parts_no_ddp_s", "parts_tflops", "parts_no_ddp_tflops"):
        assert set(ours[key]) == parts and all(v > 0 for v in ours[key].values()), (key, ours[key])
    # fp32 on the CPU: main_grad (zeroed, one accumulation) equals the gradient autograd.grad returns, bit for bit
    assert ours["parts_grad_max_rel_diff"] == {p: 0.0 for p in parts}
    for side in ("ours", "transformers"):
        r = result[side]
        counts = r["counts"]
        assert counts["aten_calls"] > 500 and counts["host_syncs"] == sum(counts["syncs_by_op"].values()) > 0
        assert counts["cuda_sync_warnings"] is None  # the CUDA sync debug mode needs a GPU
        prof = r["profiled"]
        assert Path(prof["profile"]).stat().st_size > 1000 and prof["table_wall_ms"] > 0
        assert prof["gpu_busy"] is None and prof["kernel_ms"] is None and r["gpu_busy"] is None  # no device


def test_device_time_counts_kernels_once():
    """Kernel time sums device events only (not the CPU op rows that carry the same time, nor annotations), and
    the busy time is the union of their intervals."""
    sys.path.insert(0, str(ROOT / "tools" / "bench"))
    from types import SimpleNamespace

    import torch
    from train_step import device_time

    def event(device, start, end, annotation=False):
        return SimpleNamespace(device_type=getattr(torch.autograd.DeviceType, device), is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end))

    events = [event("CPU", 0, 10_000),  # an op row spanning everything
              event("CUDA", 100, 400), event("CUDA", 300, 600),  # overlapping kernels (two streams)
              event("CUDA", 600, 700),  # touching
              event("CUDA", 1_000, 1_500),
              event("CUDA", 50, 2_000, annotation=True)]  # Optimizer.step#... on the GPU timeline
    assert device_time(events) == {"kernel_ms": 1.2, "busy_ms": 1.1, "span_ms": 1.4, "events": 4}
    assert device_time(events[:1]) is None
    assert device_time([event("CUDA", 5, 9)]) == {"kernel_ms": 0.004, "busy_ms": 0.004, "span_ms": 0.004,
                                                  "events": 1}


def test_gpu_session_cpu_smoke(tmp_path):
    """tools/bench/gpu_session.sh --cpu-smoke: every stage of the GPU session at a tiny size; at most six files in
    the result folder (the device tool returns eight), the summary's goal table last and equal to the JSON."""
    out = tmp_path / "session"
    proc = subprocess.run(["bash", "tools/bench/gpu_session.sh", str(out), "--cpu-smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "logs.tar.gz", "step.json", "step8k.json",
                                                     "summary.txt"]
    import tarfile
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"step.log", "step8k.log", "ours_step.txt", "transformers_step.txt"} <= names, names
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())
    cells = [line[2:-2].split(" | ") for line in summary.splitlines()
             if line.startswith("| ") and line.endswith(" |") and not line.startswith("| goal")]
    rows = {c[0]: c[1:] for c in cells}
    assert len(rows) == 15, rows
    step, big = (json.loads((out / f).read_text()) for f in ("step.json", "step8k.json"))
    assert step["config"]["seq_length"] == 256 and big["config"]["seq_length"] == 512
    ratio = rows["whole step, ours / transformers (benchmark: 2 x 256-token rows, 64-patch images, 1 LLM layers)"]
    assert ratio[1] == f"{step['ours']['tokens_per_s']:,.0f} / {step['transformers']['tokens_per_s']:,.0f} " \
                       f"tokens/s = {step['speedup']:.2f}x"
    syncs = rows["host syncs per step (512-token rows), ours / transformers: SyncCounter; CUDA sync-debug warnings; "
                 "aten calls"]
    counts = big["ours"]["counts"]["host_syncs"], big["transformers"]["counts"]["host_syncs"]
    assert syncs[1].startswith(f"{counts[0]} / {counts[1]}; - / -;")
    assert rows["GPU busy (union of kernel intervals / wall of one profiled step), ours / transformers"][1] == "- / -"
    assert rows["first-step loss, ours against transformers (512-token rows), relative difference"][2] == "yes"
    assert "checks: skipped (GPU only)" in summary


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
