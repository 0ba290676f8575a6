"""Host (Python + dispatcher) cost of the ViT and the decoder layers, ours against transformers, measured on the
CPU at tiny widths where the arithmetic is negligible.

    python tools/bench/host_overhead.py [--vit-depth 27] [--layers 4] [--iters 5]

At the real benchmark size one training step is bound by launching kernels, not by the GPU (docs/performance.md):
this is the figure to drive down without a GPU. For each module it prints, per forward + backward, the top-level
aten calls (about one kernel launch each on the GPU) and the wall time, with one CPU thread; the debug model's
widths with the real depths (27 ViT blocks, `--layers` MoE layers), packed inputs, grouped-GEMM experts (the GPU
path) on both sides. The table is the last thing printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import start_single_process  # noqa: E402
from train_step import build_hf_model  # noqa: E402

from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionContext, RotaryTables  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.model import packed_attention_segments  # noqa: E402
from qwenvl_mcore.parallel import ParallelLayout, cpu_compat  # noqa: E402
from qwenvl_mcore.parallel.distributed import destroy_distributed  # noqa: E402
from qwenvl_mcore.testing.parity import build_pair  # noqa: E402
from qwenvl_mcore.training.schedule import unwrap  # noqa: E402


def aten_calls(fn) -> int:
    """Top-level aten calls of one fn() (those not issued by another aten op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def measure(fn, iters: int) -> dict:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    ms = (time.perf_counter() - start) / iters * 1e3
    calls = aten_calls(fn)
    return {"ms": ms, "aten_calls": calls, "us_per_call": ms * 1e3 / calls}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit-depth", type=int, default=27)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256, help="tokens of the packed row (two samples)")
    p.add_argument("--images", type=int, default=4, help="8x8-patch images in the ViT batch")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    start_single_process()
    cfg = copy.deepcopy(flavor_hf_config("debug"))
    cfg["vision_config"]["depth"] = a.vit_depth
    cfg["text_config"]["num_hidden_layers"] = a.layers
    taps = [i for i in (8, 16, 24) if i < a.vit_depth][: a.layers]
    cfg["vision_config"]["deepstack_visual_indexes"] = taps
    args = args_from_hf_config(cfg)
    hf = build_hf_model(cfg, torch.device("cpu"), torch.float32, "grouped_mm")
    model = unwrap(build_pair(hf, ParallelLayout())[0][0])
    model.train()
    hf.train()
    for layer in model.decoder.layers:
        layer.mlp.experts.grouped_gemm = True  # the GPU path's call sequence

    v = args.vision
    grid = torch.tensor([[1, 8, 8]] * a.images)
    pixels = torch.randn(64 * a.images, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)

    def backward(outputs):
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    def ours_vit():
        merged, deep = model.vision(pixels, grid)
        backward([merged, *deep])

    def hf_vit():
        out = hf.model.visual(pixels, grid_thw=grid)
        backward([out.pooler_output, *out.deepstack_features])

    s, h = a.tokens, args.text.hidden_size
    hidden = torch.randn(s, 1, h, requires_grad=True)
    positions = torch.arange(s).view(1, 1, s).expand(3, 1, s)
    context = AttentionContext(packed_attention_segments(torch.tensor([0, s // 2, s]), s),
                               RotaryTables(model.rotary(positions), torch.float32))
    language = hf.model.language_model
    hf_hidden = torch.randn(1, s, h, requires_grad=True)
    hf_positions = torch.cat([torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)]).view(1, 1, s), positions])
    rotary = language.rotary_emb(hf_hidden, hf_positions[1:])

    def ours_decoder():
        backward([model.decoder(hidden, attention_mask=context, rotary_pos_emb=None)])

    def hf_decoder():
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=language.config, inputs_embeds=hf_hidden, attention_mask=None,
                                  past_key_values=None, position_ids=hf_positions[0])
        y = hf_hidden
        for layer in language.layers:
            y = layer(y, attention_mask=mask, position_ids=hf_positions[0], position_embeddings=rotary)
        backward([language.norm(y)])

    rows = []
    # Without a GPU, cpu_compat's device mode intercepts every torch call (about a quarter more time); it is
    # never active on the GPU, so the measurement runs without it (these modules create no CUDA tensors).
    with cpu_compat.suspended_device_mode():
        for part, ours, theirs in (("vision tower", ours_vit, hf_vit), ("decoder layers", ours_decoder, hf_decoder)):
            for name, fn in (("qwenvl-mcore", ours), ("transformers", theirs)):
                rows.append({"part": part, "impl": name, **measure(fn, a.iters)})
    destroy_distributed()
    print(f"# host cost per forward + backward on the CPU (1 thread, tiny widths): ViT {a.vit_depth} blocks, "
          f"{a.images} x 64 patches; {a.layers} MoE layers, {s} packed tokens")
    print("| part | impl | aten calls | ms | us per call |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['impl']} | {r['aten_calls']} | {r['ms']:.1f} | {r['us_per_call']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
