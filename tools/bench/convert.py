#!/usr/bin/env python
"""Benchmark the converters: throughput (GB/s) and peak resident memory on a synthetic checkpoint.

    python tools/bench/convert.py [--work DIR] [--size-gb 4] [--procs 1 2] [--max-shard-size 2GB]

Writes a random bf16 checkpoint with the real 30B-A3B widths (128 experts, hidden 2048, the full ViT), as many
LLM layers as reach --size-gb, sharded like a release; then times hf2mcore and mcore2hf with each process count,
sampling the resident memory of every process of the conversion. Prints one line per run and a JSON summary.
The memory target: every process stays under 2 x the largest input shard + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _synthetic_checkpoint(out: Path, size_gb: float, max_shard: int) -> dict:
    """Random bf16 tensors with the names and (released) shapes of a depth-reduced 30B-A3B checkpoint."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from qwenvl_mcore.conversion import hf_io
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config, released_config_dict
    from qwenvl_mcore.models.qwen3_vl_moe.hf_mapping import rules_for

    config = flavor_hf_config("qwen3_vl_30b_a3b")

    def shapes_for(layers: int) -> dict[str, tuple[int, ...]]:
        cfg = json.loads(json.dumps(config))
        cfg["text_config"]["num_hidden_layers"] = layers
        with torch.device("meta"):
            model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**cfg))
        wanted = {h for _, _, hs in rules_for(args_from_hf_config(cfg)) for h in hs}
        out = {}
        for k, v in model.state_dict().items():
            if k in wanted:
                shape = tuple(v.shape)
                out[k] = (shape[0], shape[2], shape[1]) if ".mlp.experts." in k else shape  # released layout
        return out

    layers = 3  # DeepStack adds to layers 0..2
    while sum(math.prod(s) * 2 for s in shapes_for(layers).values()) < size_gb * 1e9:
        layers += 1
    shapes = shapes_for(layers)
    config["text_config"]["num_hidden_layers"] = layers
    out.mkdir(parents=True)
    names = sorted(shapes, key=lambda n: [int(p) if p.isdigit() else p for p in n.replace(".", " . ").split()])
    shards = hf_io.plan_shards([(n, math.prod(shapes[n]) * 2) for n in names], max_shard)
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        tensors = {n: torch.empty(shapes[n], dtype=torch.bfloat16).normal_(0, 0.02, generator=gen) for n in shard}
        hf_io.write_shard(str(out / hf_io.shard_file_name(i, len(shards))), tensors)
        del tensors
    total = sum(math.prod(s) * 2 for s in shapes.values())
    hf_io.write_index(str(out), shards, total)
    released = released_config_dict(config)
    released["text_config"]["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(released, indent=2))
    largest = max(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"layers": layers, "tensors": len(shapes), "bytes": total, "shards": len(shards), "largest_shard": largest}


def _measure(cmd: list[str]) -> dict:
    """Run `cmd`; wall time and peak resident memory (largest single process, and the sum over the tree)."""
    import psutil

    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_one, peak_sum = 0, 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            peak_one, peak_sum = max(peak_one, max(rss, default=0)), max(peak_sum, sum(rss))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"seconds": time.time() - start, "peak_rss_process": peak_one, "peak_rss_total": peak_sum}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="scratch directory (default: a temporary one, removed afterwards)")
    p.add_argument("--size-gb", type=float, default=4.0)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-shard-size", default="2GB")
    a = p.parse_args(argv)

    from qwenvl_mcore.conversion.hf_io import parse_size

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        src = work / "hf"
        if not src.exists():
            t = time.time()
            info = _synthetic_checkpoint(src, a.size_gb, parse_size(a.max_shard_size))
            print(f"synthetic checkpoint: {info} ({time.time() - t:.0f} s)", flush=True)
        largest = max(f.stat().st_size for f in src.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        budget = 2 * largest + 2**30
        rows = []
        for procs in a.procs:
            mcore, back = work / f"mcore{procs}", work / f"back{procs}"
            for direction, cmd in (
                ("hf2mcore", ["tools/convert/hf2mcore.py", "--hf", src, "--out", mcore]),
                ("mcore2hf", ["tools/convert/mcore2hf.py", "--mcore", mcore, "--out", back,
                              "--max-shard-size", a.max_shard_size]),
            ):
                r = _measure([sys.executable, str(ROOT / cmd[0]), *map(str, cmd[1:]), "--procs", str(procs),
                              "--overwrite", "--no-progress"])
                r.update(direction=direction, procs=procs, gb_per_s=size / 1e9 / r["seconds"],
                         within_budget=r["peak_rss_process"] <= budget)
                rows.append(r)
                print(f"{direction:8s} procs={procs}  {size / 1e9:.2f} GB in {r['seconds']:.1f} s = "
                      f"{r['gb_per_s']:.2f} GB/s  peak RSS/process {r['peak_rss_process'] / 2**30:.2f} GiB "
                      f"(budget {budget / 2**30:.2f} GiB), all processes {r['peak_rss_total'] / 2**30:.2f} GiB",
                      flush=True)
            shutil.rmtree(back)
            shutil.rmtree(mcore)
        print(json.dumps({"input_bytes": size, "largest_shard": largest, "budget_bytes": budget, "runs": rows}))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
