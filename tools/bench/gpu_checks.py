"""Correctness of the GPU-only kernels against references, on a CUDA device (CI has none: it checks the CPU paths
of the same code, tests/unit/test_attention.py and test_experts.py).

    python tools/bench/gpu_checks.py [--json out.json]

1. Segment attention: the varlen flash kernel against the grouped-SDPA path and a float64 reference, forward and
   gradients, for a packed LLM row (32 query / 4 KV heads of 128, causal, padding singletons) and a ViT batch
   (16 heads of 72, four 1,024-patch frames, bidirectional).
2. Experts: the bf16 grouped GEMM against the bf16 loop and a float32 reference, output and gradients, at the
   30B shape with about 512 rows per expert.
Relative errors are ||x - ref|| / ||ref||; a check passes when the fast path's error is within 2x of the reference
path's plus 1e-3 (both are bf16 against the same high-precision reference). Exit status 1 when any fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from experts import routed_counts  # tools/bench/experts.py (this script's directory is on sys.path)
from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionSegments, segment_attention, varlen_available
from qwenvl_mcore.models.qwen3_vl_moe.layers import expert_matmul


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _grads(fn, inputs, grad):
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, inputs, grad)]


def check_attention(name, lengths, hq, hkv, d, causal, device) -> dict:
    g = torch.Generator().manual_seed(0)
    s = sum(lengths)
    base = [torch.randn(s, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv)]
    grad = torch.randn(s, hq, d, generator=g, dtype=torch.float64)
    segments = AttentionSegments.from_lengths(lengths, causal=causal, device=device)
    ref = _grads(lambda q, k, v: segment_attention(q, k, v, segments, use_varlen=False),
                 [t.to(device).requires_grad_() for t in base], grad.to(device))
    bf = [t.to(device, torch.bfloat16).requires_grad_() for t in base]
    gb = grad.to(device, torch.bfloat16)
    grouped = _grads(lambda q, k, v: segment_attention(q, k, v, segments, use_varlen=False), bf, gb)
    varlen = _grads(lambda q, k, v: segment_attention(q, k, v, segments, use_varlen=True), bf, gb)
    parts = ("out", "dq", "dk", "dv")
    errors = {f"varlen_{p}": rel(x, r) for p, x, r in zip(parts, varlen, ref)}
    errors.update({f"grouped_{p}": rel(x, r) for p, x, r in zip(parts, grouped, ref)})
    ok = all(errors[f"varlen_{p}"] <= 2 * errors[f"grouped_{p}"] + 1e-3 for p in parts)
    return {"check": f"attention {name}", "ok": ok, **errors}


def check_experts(device) -> dict:
    g = torch.Generator().manual_seed(0)
    experts, hidden, ffn, rows = 128, 2048, 768, 512
    counts = routed_counts(experts, rows, g)
    total = int(counts.sum())
    x = torch.randn(total, hidden, generator=g)
    w = torch.randn(experts, hidden, 2 * ffn, generator=g) * hidden**-0.5
    grad = torch.randn(total, 2 * ffn, generator=g)
    ref = _grads(lambda x, w: expert_matmul(x, w, counts, grouped=False),
                 [x.to(device).requires_grad_(), w.to(device).requires_grad_()], grad.to(device))
    bf = [x.to(device, torch.bfloat16).requires_grad_(), w.to(device, torch.bfloat16).requires_grad_()]
    gb = grad.to(device, torch.bfloat16)
    grouped = _grads(lambda x, w: expert_matmul(x, w, counts.to(device), grouped=True), bf, gb)
    loop = _grads(lambda x, w: expert_matmul(x, w, counts, grouped=False), bf, gb)
    parts = ("out", "dx", "dw")
    errors = {f"grouped_{p}": rel(a, r) for p, a, r in zip(parts, grouped, ref)}
    errors.update({f"loop_{p}": rel(a, r) for p, a, r in zip(parts, loop, ref)})
    ok = all(errors[f"grouped_{p}"] <= 2 * errors[f"loop_{p}"] + 1e-3 for p in parts)
    return {"check": "experts grouped GEMM (30B shape, bf16)", "ok": ok, **errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device; the CPU paths are checked by the unit tests", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    results = []
    if not varlen_available(torch.zeros(1, device=device, dtype=torch.bfloat16)):
        results.append({"check": "varlen attention kernel present", "ok": False})
    else:
        results.append(check_attention("LLM packed row", [1024, 1500, 1024, 500] + [1] * 48, 32, 4, 128, True, device))
        results.append(check_attention("ViT frames", [1024] * 4, 16, 16, 72, False, device))
    results.append(check_experts(device))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    for r in results:
        detail = ", ".join(f"{k} {v:.1e}" for k, v in r.items() if isinstance(v, float))
        print(f"{'PASS' if r['ok'] else 'FAIL'} {r['check']}: {detail}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
