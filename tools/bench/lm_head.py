"""The LM head + cross-entropy of one micro-batch at TP=1, chunked (qwenvl_mcore/models/qwen3_vl_moe/lm_loss.py)
against megatron's unchunked path (ColumnParallelLinear, then cross_entropy on the fp32 logits), as the model runs
them (model.py, `model.loss_chunk_tokens`): forward + backward time, peak memory and how far the chunked results
are from the unchunked ones.

    python tools/bench/lm_head.py [--tokens 4096] [--hidden 2048] [--vocab 151936] [--chunks 0,256,384,768]
        [--dtype bf16] [--iters 10] [--warmup 3] [--json out.json]

Defaults are Qwen3-VL-30B-A3B's widths and the benchmark's 4,096-token rows, in bf16 on the GPU. `--chunks`: the
`loss_chunk_tokens` values to time, 0 being the unchunked path (always run: the reference). Per setting:
forward + backward ms (median; gradients of the hidden states and the weight by torch.autograd.grad, the upstream
gradient uniform as the trainer's summed loss gives), forward-only ms (no grad, as evaluation with labels), model
TFLOP/s (3 GEMMs of 2*N*h*V, whatever the path runs: the chunked one runs a 4th to recompute the logits), the peak
memory above the inputs (GPU), and the largest loss, hidden-gradient and weight-gradient differences from the
unchunked path (relative to the largest value). The table is printed last.
On the CPU at a tiny size (tests/unit/test_lm_loss.py): --tokens 300 --hidden 32 --vocab 1000 --dtype fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, peak_gib, reset_peak, start_single_process, synchronize, time_call  # noqa: E402

from qwenvl_mcore.models.qwen3_vl_moe.lm_loss import token_losses  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def unchunked_losses(layer, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """model.py's head at TP=1 with `loss_chunk_tokens=0`: [s, b] losses, 0 where ignored."""
    logits, _ = layer(hidden)
    ignore = labels == IGNORE_INDEX
    target = labels.masked_fill(ignore, 0)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                                             reduction="none").view_as(target)
    return loss.masked_fill(ignore, 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the micro-batch (one packed row)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunks", default="0,256,384,768", help="loss_chunk_tokens values; 0 = unchunked")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)

    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    start_single_process()
    chunks = sorted({0, *(int(c) for c in a.chunks.split(","))})
    if any(c < 0 for c in chunks):
        raise SystemExit(f"--chunks {a.chunks}: token counts, 0 or more (0: unchunked)")

    config = ModelParallelConfig(params_dtype=dtype, use_cpu_initialization=device.type == "cpu",
                                 perform_initialization=False)
    layer = ColumnParallelLinear(a.hidden, a.vocab, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                 gather_output=False).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(dtype))
    hidden = torch.randn(a.tokens, 1, a.hidden, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, a.vocab, (a.tokens, 1), generator=g)
    labels[torch.rand(a.tokens, 1, generator=g) < 0.1] = IGNORE_INDEX
    labels = labels.to(device)
    scale = 1.0 / int((labels != IGNORE_INDEX).sum())  # the trainer's summed loss over its tokens

    def losses(chunk):
        if chunk == 0:
            return unchunked_losses(layer, hidden, labels)
        return token_losses(hidden, layer.weight, labels, IGNORE_INDEX, chunk)

    def fwd_bwd(chunk):
        loss = losses(chunk)
        return (loss.detach(), *torch.autograd.grad(loss.sum() * scale, [hidden, layer.weight]))

    def fwd(chunk):
        with torch.no_grad():
            return losses(chunk)

    flops = 3 * 2 * a.tokens * a.hidden * a.vocab
    rows, reference = [], None
    for chunk in chunks:
        reset_peak(device)
        base = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        out = fwd_bwd(chunk)
        synchronize(device)
        peak = peak_gib(device)
        if chunk == 0:
            reference = out
        diffs = [((o.float() - r.float()).abs().max() / r.float().abs().max()).item() for o, r in zip(out, reference)]
        del out
        t = time_call(lambda: fwd_bwd(chunk), device, warmup=a.warmup, iters=a.iters)
        tf = time_call(lambda: fwd(chunk), device, warmup=a.warmup, iters=a.iters)
        rows.append({"loss_chunk_tokens": chunk, "fwd_bwd_ms": t["median_s"] * 1e3, "fwd_ms": tf["median_s"] * 1e3,
                     "model_tflops": flops / t["median_s"] / 1e12,
                     "peak_extra_gib": None if peak is None else peak - base,
                     "loss_rel_diff": diffs[0], "hidden_grad_rel_diff": diffs[1], "weight_grad_rel_diff": diffs[2]})
    result = {"tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "dtype": str(dtype).split(".")[-1],
              "env": environment(device), "results": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"LM head + loss, {a.tokens} tokens x hidden {a.hidden} x vocab {a.vocab}, {result['dtype']}, "
          f"{result['env']['device']}")
    print("| loss_chunk_tokens | fwd+bwd ms | fwd ms | model TFLOP/s | peak above inputs GiB | loss / dh / dW rel diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f}"
        name = "0 (unchunked)" if r["loss_chunk_tokens"] == 0 else str(r["loss_chunk_tokens"])
        print(f"| {name} | {r['fwd_bwd_ms']:.2f} | {r['fwd_ms']:.2f} | {r['model_tflops']:.1f} | {peak} | "
              f"{r['loss_rel_diff']:.1e} / {r['hidden_grad_rel_diff']:.1e} / {r['weight_grad_rel_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
