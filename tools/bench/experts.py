"""The routed experts alone at the real shapes: one grouped GEMM per projection against a loop over experts.

    python tools/bench/experts.py [--shape 30b 235b] [--rows 512] [--device cuda] [--json out.json]

Shapes: 30b = 128 experts, hidden 2048, moe_intermediate 768 (gate/up GEMM 2048 x 1536); 235b = 128 experts,
hidden 4096, moe_intermediate 1536; tiny = a CPU smoke size. Rows per expert are the rows a top-8 router sends
(tokens x 8 / experts, default about 512), drawn from a uniform random routing, so counts vary around the mean.
Each implementation is the project's own `expert_matmul` (the code the model runs), SwiGLU and the routing-weight
scale included. Printed per shape and implementation: TFLOP/s of the gate/up GEMM forward, of the whole experts
layer forward, and of its forward + backward (FLOPs: 2 x rows x k x n per GEMM, backward = 2 x forward), with the
largest relative difference of grouped against loop. The table is the last thing printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, time_call  # noqa: E402

from qwenvl_mcore.models.qwen3_vl_moe.layers import expert_matmul  # noqa: E402

SHAPES = {"30b": (128, 2048, 768), "235b": (128, 4096, 1536), "tiny": (16, 64, 32)}
TOP_K = 8


def routed_counts(experts: int, rows_per_expert: int, generator: torch.Generator) -> torch.Tensor:
    """Rows per expert when tokens = experts x rows / top-k each pick top-k distinct experts at random."""
    k = min(TOP_K, experts)
    tokens = experts * rows_per_expert // k
    choice = torch.rand(tokens, experts, generator=generator).topk(k, dim=1).indices
    return torch.bincount(choice.reshape(-1), minlength=experts)


def experts_layer(x, w1, w2, probs, counts, grouped: bool):
    gate_up = expert_matmul(x, w1, counts, grouped=grouped)
    gate, up = gate_up.view(-1, 2, w2.shape[1]).unbind(1)
    return expert_matmul(F.silu(gate) * up, w2, counts, grouped=grouped) * probs[:, None]


def bench_shape(name: str, rows: int, device: torch.device, dtype: torch.dtype, *, implementations, warmup, iters):
    experts, hidden, ffn = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    counts = routed_counts(experts, rows, g)
    total = int(counts.sum())
    x = (torch.randn(total, hidden, generator=g) * 0.5).to(device, dtype).requires_grad_()
    w1 = (torch.randn(experts, hidden, 2 * ffn, generator=g) * hidden**-0.5).to(device, dtype).requires_grad_()
    w2 = (torch.randn(experts, ffn, hidden, generator=g) * ffn**-0.5).to(device, dtype).requires_grad_()
    probs = torch.rand(total, generator=g).to(device, dtype)
    grad = torch.randn(total, hidden, generator=g).to(device, dtype)
    counts_dev = counts.to(device)
    gemm_flops = 2 * total * hidden * 2 * ffn
    layer_flops = 6 * total * hidden * ffn
    results, outputs = [], {}
    for impl in implementations:
        grouped = impl == "grouped"
        c = counts_dev if grouped else counts

        def gemm():
            with torch.no_grad():
                expert_matmul(x, w1, c, grouped=grouped)

        def forward():
            with torch.no_grad():
                experts_layer(x, w1, w2, probs, c, grouped)

        def forward_backward():
            out = experts_layer(x, w1, w2, probs, c, grouped)
            torch.autograd.grad(out, (x, w1, w2), grad)

        out = experts_layer(x, w1, w2, probs, c, grouped)
        outputs[impl] = (out.detach().float(), [t.float() for t in torch.autograd.grad(out, (x, w1, w2), grad)])
        t_gemm = time_call(gemm, device, warmup=warmup, iters=iters)["median_s"]
        t_fwd = time_call(forward, device, warmup=warmup, iters=iters)["median_s"]
        t_fb = time_call(forward_backward, device, warmup=warmup, iters=iters)["median_s"]
        results.append({
            "shape": name, "impl": impl, "experts": experts, "hidden": hidden, "moe_intermediate": ffn,
            "rows": total, "rows_per_expert_mean": total / experts, "rows_per_expert_min": int(counts.min()),
            "rows_per_expert_max": int(counts.max()),
            "gemm_fwd_ms": t_gemm * 1e3, "gemm_fwd_tflops": gemm_flops / t_gemm / 1e12,
            "layer_fwd_ms": t_fwd * 1e3, "layer_fwd_tflops": layer_flops / t_fwd / 1e12,
            "layer_fwd_bwd_ms": t_fb * 1e3, "layer_fwd_bwd_tflops": 3 * layer_flops / t_fb / 1e12,
        })
    if len(outputs) == 2:
        (o1, g1), (o2, g2) = outputs["grouped"], outputs["loop"]
        diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip([o1, *g1], [o2, *g2]))
        for r in results:
            r["rel_diff_grouped_vs_loop"] = diff
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["30b", "235b"], choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, default=512, help="mean rows per expert (default 512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="default: bfloat16 on the GPU, float32 on the CPU")
    p.add_argument("--impl", nargs="+", default=["grouped", "loop"], choices=("grouped", "loop"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    env = environment(device)
    rows = []
    for name in args.shape:
        rows += bench_shape(name, args.rows, device, dtype, implementations=args.impl, warmup=args.warmup,
                            iters=args.iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "dtype": str(dtype), "results": rows}, f, indent=1)
    print(f"# experts benchmark: {env}, {dtype}")
    print("| shape | impl | rows/expert (min-max) | gate/up GEMM fwd TFLOP/s | layer fwd TFLOP/s "
          "| layer fwd+bwd TFLOP/s "
          "| fwd+bwd ms | rel diff vs loop |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = r.get("rel_diff_grouped_vs_loop")
        print(f"| {r['shape']} | {r['impl']} | {r['rows_per_expert_mean']:.0f} ({r['rows_per_expert_min']}-"
              f"{r['rows_per_expert_max']}) | {r['gemm_fwd_tflops']:.1f} | {r['layer_fwd_tflops']:.1f} | "
              f"{r['layer_fwd_bwd_tflops']:.1f} | {r['layer_fwd_bwd_ms']:.2f} | "
              f"{'' if diff is None else f'{diff:.1e}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
