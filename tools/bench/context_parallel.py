"""Context-parallel attention (all-gather K/V) on 2 gloo ranks vs one rank's full attention, on the CPU.

    python tools/bench/context_parallel.py [--tokens 4096 8192] [--repeats 2] [--dtype bf16] [--extrapolate 32768]

One attention layer at Qwen3-VL-30B-A3B's widths (32 query heads, 4 KV heads, head_dim 128; the flavor's config
is checked), one sample filling a row of s tokens, forward + backward:
- full: one rank, causal SDPA over the whole row (what a CP1 rank runs for that row: one segment, is_causal);
- cp2:  two ranks, each holding its s/2 tokens (chunks r and 3-r of the row, parallel/context_parallel.py's split),
        `ContextParallelAttention.attend`: all-gather of K and V (one collective), the rank's query blocks against
        their keys picked from the gathered row, reduce-scatter of dK/dV in backward.
Each rank runs one thread (two ranks = the machine's two cores; the full run has one rank, so one core).
Reported per length: the best wall time of `--repeats` forward+backward passes (the slower CP rank), the bytes
autograd saves for backward (distinct storages: the peak of what the layer keeps between its forward and its
backward), and the transient K/V buffers of the CP forward (the gathered row and the picked keys, alive while the
layer attends, not saved). With `--extrapolate S` the figures are scaled to S tokens from the longest measured
length: time by (S/s)^2 (attention FLOPs are quadratic), saved bytes term by term (linear terms by S/s, the mask
biases by (S/s)^2); printed as "extrapolated". A ring exchange (megatron's p2p) would keep two chunks of K/V at a
time instead of the gathered row; its figure is computed, not measured. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128


def _saved(fn) -> tuple[object, int]:
    import torch

    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _rank_fn(rank: int, world: int, tokens: list[int], repeats: int, dtype_name: str) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from qwenvl_mcore.parallel.context_parallel import RowSplit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(rank)
    results = []
    for s in tokens:
        res = {"tokens": s}
        # one rank's full attention (rank 0 alone; the other waits, so it has a core to itself)
        if rank == 0:
            q = torch.randn(1, HEADS, s, HEAD_DIM, dtype=dtype, generator=gen, requires_grad=True)
            k = torch.randn(1, KV_HEADS, s, HEAD_DIM, dtype=dtype, generator=gen, requires_grad=True)
            v = torch.randn(1, KV_HEADS, s, HEAD_DIM, dtype=dtype, generator=gen, requires_grad=True)
            best, saved = float("inf"), 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                out, saved = _saved(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
                out.sum().backward()
                best = min(best, time.perf_counter() - t0)
                q.grad = k.grad = v.grad = None
            res["full"] = {"seconds": best, "saved_bytes": saved}
            del q, k, v, out
        dist.barrier()
        split = RowSplit.build([0, s], s, world)
        attn = split.attention(rank, group)
        n = split.n
        q = torch.randn(n, HEADS, HEAD_DIM, dtype=dtype, generator=gen, requires_grad=True)
        k = torch.randn(n, KV_HEADS, HEAD_DIM, dtype=dtype, generator=gen, requires_grad=True)
        v = torch.randn(n, KV_HEADS, HEAD_DIM, dtype=dtype, generator=gen, requires_grad=True)
        best, saved, comm = float("inf"), 0, float("inf")
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            out, saved = _saved(lambda: attn.attend(q, k, v))
            out.sum().backward()
            elapsed = time.perf_counter() - t0
            q.grad = k.grad = v.grad = None
            elapsed_t = torch.tensor([elapsed])
            dist.all_reduce(elapsed_t, op=dist.ReduceOp.MAX)  # the step waits for the slower rank
            best = min(best, float(elapsed_t))
            # the collectives alone: all-gather of [n, 2*kv_heads, d] and the reduce-scatter back
            kv = torch.cat((k, v), dim=1).detach().contiguous()
            row = kv.new_empty((world * n, *kv.shape[1:]))
            dist.barrier()
            t1 = time.perf_counter()
            dist.all_gather_into_tensor(row, kv, group=group)
            dist.reduce_scatter_tensor(kv, row, group=group)
            comm = min(comm, time.perf_counter() - t1)
        keys = int(attn.key_rows.numel())
        elem = torch.finfo(dtype).bits // 8
        res["cp"] = {"rank": rank, "seconds": best, "saved_bytes": saved, "comm_seconds": comm, "local_tokens": n,
                     "key_rows": keys,
                     "gathered_kv_bytes": world * n * 2 * KV_HEADS * HEAD_DIM * elem,
                     "picked_kv_bytes": 2 * keys * KV_HEADS * HEAD_DIM * elem,
                     "mask_bias_bytes": sum(elem * ql * kl * 1 for ql, kl, m, _, _ in attn.groups
                                            if (ql, kl) in attn.masks)}
        results.append(res)
        del q, k, v, out
    dist.destroy_process_group()
    return {"rank": rank, "results": results}


def _check_widths() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config

    t = args_from_hf_config(flavor_hf_config("qwen3_vl_30b_a3b")).text
    got = (t.num_attention_heads, t.num_key_value_heads, t.head_dim)
    if got != (HEADS, KV_HEADS, HEAD_DIM):
        raise SystemExit(f"qwen3_vl_30b_a3b's attention is {got}, the bench assumes {(HEADS, KV_HEADS, HEAD_DIM)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--extrapolate", type=int, default=32768, help="scale the longest measurement to this length")
    args = p.parse_args(argv)
    _check_widths()
    from qwenvl_mcore.parallel.spawn import run_on_ranks

    ranks = run_on_ranks(_rank_fn, 2, args.tokens, args.repeats, args.dtype)
    mib = 2**20
    elem = 2 if args.dtype == "bf16" else 4
    rows = []
    for i, s in enumerate(args.tokens):
        full = ranks[0]["results"][i]["full"]
        cps = [r["results"][i]["cp"] for r in ranks]
        cp = max(cps, key=lambda c: c["saved_bytes"])
        row = {"tokens": s, "full_s": full["seconds"], "cp2_s": cps[0]["seconds"],
               "cp2_comm_s": max(c["comm_seconds"] for c in cps), "full_saved_mib": full["saved_bytes"] / mib,
               "cp2_saved_mib": cp["saved_bytes"] / mib, "cp2_mask_bias_mib": cp["mask_bias_bytes"] / mib,
               "cp2_picked_kv_mib": cp["picked_kv_bytes"] / mib, "cp2_gathered_kv_mib": cp["gathered_kv_bytes"] / mib,
               # a ring holds its own chunk pair and the one in flight: 2 x (s/cp) rows of K and V
               "ring_kv_mib": 2 * 2 * (s // 2) * KV_HEADS * HEAD_DIM * elem / mib}
        rows.append(row)
    print(f"one attention layer, {HEADS} heads / {KV_HEADS} KV heads / head_dim {HEAD_DIM}, {args.dtype}, one sample "
          f"per row, forward+backward, 1 thread per rank, best of {args.repeats}")
    print("| tokens | full 1 rank s | CP2 s (slower rank) | CP2 collectives s | full saved MiB | CP2 saved MiB/rank "
          "| of which mask biases | K/V blocks | transient gathered K/V | ring's K/V (2 chunks) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['full_s']:.2f} | {r['cp2_s']:.2f} | {r['cp2_comm_s']:.3f} | "
              f"{r['full_saved_mib']:.1f} | {r['cp2_saved_mib']:.1f} | {r['cp2_mask_bias_mib']:.1f} | "
              f"{r['cp2_picked_kv_mib']:.1f} | {r['cp2_gathered_kv_mib']:.1f} | {r['ring_kv_mib']:.1f} |")
    last = rows[-1]
    f = args.extrapolate / last["tokens"]
    if f != 1:
        linear = last["cp2_saved_mib"] - last["cp2_mask_bias_mib"]
        ext = {"tokens": args.extrapolate, "from_tokens": last["tokens"], "full_s": last["full_s"] * f * f,
               "cp2_s": last["cp2_s"] * f * f, "full_saved_mib": last["full_saved_mib"] * f,
               "cp2_saved_mib": linear * f + last["cp2_mask_bias_mib"] * f * f,
               "cp2_mask_bias_mib": last["cp2_mask_bias_mib"] * f * f,
               "cp2_picked_kv_mib": last["cp2_picked_kv_mib"] * f, "cp2_gathered_kv_mib": last["cp2_gathered_kv_mib"] * f,
               "ring_kv_mib": last["ring_kv_mib"] * f}
        print(f"extrapolated to {args.extrapolate} tokens from {last['tokens']} (time x{f * f:g}, linear bytes x{f:g}, "
              f"mask biases x{f * f:g}): full {ext['full_s']:.1f} s, CP2 {ext['cp2_s']:.1f} s per rank; saved "
              f"{ext['full_saved_mib']:.0f} MiB full vs {ext['cp2_saved_mib']:.0f} MiB per CP2 rank (mask biases "
              f"{ext['cp2_mask_bias_mib']:.0f}, K/V blocks {ext['cp2_picked_kv_mib']:.0f}); transient gathered K/V "
              f"{ext['cp2_gathered_kv_mib']:.0f} MiB vs a ring's {ext['ring_kv_mib']:.0f} MiB")
        rows.append({"extrapolated": ext})
    print(json.dumps({"dtype": args.dtype, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
