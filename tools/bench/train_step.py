"""One training step of a depth-reduced Qwen3-VL MoE on one device, ours against transformers on the same weights
and batch.

    python tools/bench/train_step.py [--flavor qwen3_vl_30b_a3b] [--layers 4] [--seq-length 4096]
        [--samples-per-row 4] [--image-side 32] [--microbatches 2] [--steps 4] [--warmup 2] [--json out.json]

The model is the released config with `--layers` LLM layers (real widths, all experts, top-k as released) and the
full vision tower; the DeepStack taps are kept while there are layers for them. Each micro-batch is one packed row
of `--seq-length` tokens holding `--samples-per-row` samples, each with one image of side x side patches (32 x 32 =
1,024 patches, 256 visual tokens) and random text, trained on the text.

Ours: the trainer's own step (`training.step.train_step`: megatron DDP, distributed optimizer with fp32 main
weights, per-token loss, aux loss), bf16 on the GPU, grouped-GEMM experts, varlen flash attention. Also timed apart
(forward + backward of one micro-batch): the decoder layers, the LM head with the loss, the vision tower.
transformers: `Qwen3VLMoeForConditionalGeneration` in bf16, sdpa attention, `--hf-experts` (grouped_mm), torch's
fused AdamW, the same micro-batches (its packed-sequence mask from per-sample position ids; router aux loss on).

Printed: tokens/s, model TFLOP/s and MFU (Megatron-LM's formula, training.metrics; LM head and vision apart), peak
memory, the first-step loss of both (same weights and data: they must agree), and the speed ratio. The table is
the last thing printed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, peak_gib, reset_peak, start_single_process, synchronize, time_call  # noqa: E402

from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.model import (  # noqa: E402
    IGNORE_INDEX, MultimodalInputs, packed_attention_segments, shift_labels)
from qwenvl_mcore.models.qwen3_vl_moe.rope import packed_position_ids  # noqa: E402
from qwenvl_mcore.parallel import ParallelLayout  # noqa: E402
from qwenvl_mcore.parallel.distributed import destroy_distributed  # noqa: E402
from qwenvl_mcore.training import metrics  # noqa: E402
from qwenvl_mcore.training.schedule import unwrap  # noqa: E402
from qwenvl_mcore.training.setup import OptimSettings, build_optimizer, wrap_ddp  # noqa: E402
from qwenvl_mcore.training.step import train_step  # noqa: E402


def reduced_config(flavor: str, layers: int | None) -> dict:
    """The flavor's HF config with `layers` LLM layers (DeepStack taps trimmed to the layers that exist)."""
    cfg = copy.deepcopy(flavor_hf_config(flavor))
    if layers is not None:
        cfg["text_config"]["num_hidden_layers"] = layers
        taps = cfg["vision_config"].get("deepstack_visual_indexes") or []
        cfg["vision_config"]["deepstack_visual_indexes"] = list(taps[:layers])
    return cfg


def synthetic_rows(args, *, rows: int, seq_length: int, samples: int, side: int, seed: int):
    """`rows` packed micro-batches: (ours: MultimodalInputs on the host, HF: dict of the same data)."""
    g = torch.Generator().manual_seed(seed)
    v = args.vision
    image_tokens = (side // v.spatial_merge_size) ** 2
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    special = min(args.image_token_id, args.video_token_id, args.vision_start_token_id, args.vision_end_token_id)
    text_vocab = min(special, args.text.vocab_size)
    out = []
    for _ in range(rows):
        ids, labels, cu = [], [], [0]
        for i in range(samples):
            length = seq_length // samples if i < samples - 1 else seq_length - (seq_length // samples) * (samples - 1)
            text = length - image_tokens - 2
            if text < 2:
                raise SystemExit(f"--seq-length {seq_length} / {samples} samples leaves no room for text next to "
                                 f"{image_tokens} image tokens")
            words = torch.randint(0, text_vocab, (text,), generator=g)
            sample = torch.cat([torch.tensor([args.vision_start_token_id]),
                                torch.full((image_tokens,), args.image_token_id),
                                torch.tensor([args.vision_end_token_id]), words])
            hf_style = sample.clone()
            hf_style[: image_tokens + 2] = IGNORE_INDEX  # train on the text
            ids.append(sample)
            labels.append(shift_labels(hf_style[None])[0])  # aligned per sample: never across a boundary
            cu.append(cu[-1] + length)
        input_ids = torch.cat(ids)[None]
        aligned = torch.cat(labels)[None]
        grid = torch.tensor([[1, side, side]] * samples)
        pixels = torch.randn(samples * side * side, patch_dim, generator=g)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
        ours = MultimodalInputs(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid, labels=aligned,
                                cu_seqlens=cu_seqlens)
        mrope = packed_position_ids(input_ids, cu_seqlens, grid, None, image_token_id=args.image_token_id,
                                    video_token_id=args.video_token_id,
                                    vision_start_token_id=args.vision_start_token_id,
                                    spatial_merge_size=v.spatial_merge_size)
        text_positions = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])[None, None]
        hf = {"input_ids": input_ids, "pixel_values": pixels, "image_grid_thw": grid,
              # transformers shifts labels itself; this gives every position the same target as ours
              "labels": torch.cat([torch.full((1, 1), IGNORE_INDEX), aligned[:, :-1]], dim=1),
              # row 0: text positions restarting per sample, from which transformers builds its packed mask
              "position_ids": torch.cat([text_positions, mrope], dim=0)}
        out.append((ours, hf))
    return out


def build_hf_model(cfg: dict, device, dtype, experts_impl: str):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    config = Qwen3VLMoeConfig(**copy.deepcopy(cfg))
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if experts_impl != "default":
        kwargs["experts_implementation"] = experts_impl
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen3VLMoeForConditionalGeneration._from_config(config, **kwargs)


def flops_of(args, rows) -> dict:
    """Model FLOPs of one step over these micro-batches, by part."""
    lengths = [int(b - a) for ours, _ in rows for a, b in zip(ours.cu_seqlens[:-1], ours.cu_seqlens[1:])]
    tokens = sum(lengths)
    language = metrics.language_flops(args, lengths)
    head = metrics.lm_head_flops(args, tokens)
    grids = torch.cat([ours.image_grid_thw for ours, _ in rows])
    vision = metrics.vision_flops(args, grids, vit_trains=True, merger_trains=True)
    return {"tokens": tokens, "decoder": language - head, "lm_head": head, "vision": vision,
            "total": language + vision}


def bench_parts(model, args, batch: MultimodalInputs, device, *, warmup: int, iters: int) -> dict:
    """Forward + backward of the decoder layers, the LM head + loss, and the vision tower alone (one micro-batch)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    s = batch.input_ids.shape[1]
    dtype = model.config.params_dtype
    g = torch.Generator().manual_seed(1)
    positions = model.position_ids(batch).to(device)
    rotary = model.rotary(positions)
    segments = packed_attention_segments(batch.cu_seqlens, s, device=device)
    hidden = (torch.randn(s, 1, args.text.hidden_size, generator=g) * 0.5).to(device, dtype).requires_grad_()
    grad = torch.randn(s, 1, args.text.hidden_size, generator=g).to(device, dtype)
    target = batch.labels.transpose(0, 1).to(device).clamp_min(0)
    pixels, grid = batch.pixel_values.to(device), batch.image_grid_thw

    def decoder():
        out = model.decoder(hidden, attention_mask=segments, rotary_pos_emb=rotary)
        torch.autograd.backward(out, grad)

    def head():
        logits, _ = model.output_layer(hidden)
        vocab_parallel_cross_entropy(logits.float(), target).sum().backward()

    def vision():
        merged, deep = model.vision(pixels, grid)
        torch.autograd.backward([merged, *deep], [torch.ones_like(merged), *[torch.ones_like(d) for d in deep]])

    return {name: time_call(fn, device, warmup=warmup, iters=iters)["median_s"]
            for name, fn in (("decoder", decoder), ("lm_head", head), ("vision", vision))}


def profiled(fn, path: str, device) -> dict:
    """Run fn once under torch.profiler; write the op table (by self device time) to `path`; return the wall time
    and the summed kernel time of that run."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.key_averages()
    sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    busy_us = sum(getattr(e, sort, 0) for e in events) if device.type == "cuda" else 0
    with open(path, "w") as f:
        f.write(events.table(sort_by=sort if device.type == "cuda" else "self_cpu_time_total", row_limit=60))
    wall_us = max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
    return {"profile": path, "wall_ms": wall_us / 1e3, "kernel_ms": busy_us / 1e3}


def bench_ours(hf_model, cfg, rows, device, dtype, *, steps: int, warmup: int, parts: bool,
               profile_dir: str | None = None) -> dict:
    from qwenvl_mcore.testing.parity import build_pair

    args = args_from_hf_config(cfg)
    chunks, _ = build_pair(hf_model, ParallelLayout(), dtype=dtype)
    hf_model.to("cpu")  # the weights now live in ours; keep the device for one model at a time
    reset_peak(device)
    chunks = wrap_ddp(chunks, distributed_optimizer=True)
    optimizer, _ = build_optimizer(chunks, OptimSettings(lr=1e-5, clip_grad=1.0), steps=steps + warmup + 1)
    for c in chunks:
        c.train()
    # pixels on the device up front, as transformers gets its whole batch (a trainer would prefetch them); the token
    # ids stay on the host, where the model computes the packed MRoPE positions from them
    micro = [replace(ours, pixel_values=ours.pixel_values.to(device)) for ours, _ in rows]
    first = train_step(chunks, optimizer, micro)
    result = {"first_loss": first.loss, "first_aux_loss": first.aux_loss}
    result["step_s"] = time_call(lambda: train_step(chunks, optimizer, micro), device, warmup=warmup - 1,
                                 iters=steps)["median_s"]
    result["peak_gib"] = peak_gib(device)
    if profile_dir:
        result["profiled"] = profiled(lambda: train_step(chunks, optimizer, micro),
                                      os.path.join(profile_dir, "ours_step.txt"), device)
    if parts:
        result["parts_s"] = bench_parts(unwrap(chunks[0]), args, micro[0], device, warmup=1, iters=max(steps, 3))
    return result  # the model and optimizer are freed with this frame (main collects)


def bench_transformers(hf_model, rows, device, *, steps: int, warmup: int, profile_dir: str | None = None) -> dict:
    hf_model.to(device)
    hf_model.train()
    batches = [{k: v.to(device) for k, v in hf.items()} for _, hf in rows]
    tokens = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
    with torch.no_grad():
        lm = sum(float(hf_model(**b, use_cache=False).loss) * n for b, n in zip(batches, tokens)) / sum(tokens)
    reset_peak(device)
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        for b, n in zip(batches, tokens):
            out = hf_model(**b, use_cache=False, output_router_logits=True)
            (out.loss * (n / sum(tokens))).backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optimizer.step()

    step_s = time_call(step, device, warmup=warmup, iters=steps)["median_s"]
    result = {"first_loss": lm, "step_s": step_s, "peak_gib": peak_gib(device)}
    if profile_dir:
        result["profiled"] = profiled(step, os.path.join(profile_dir, "transformers_step.txt"), device)
    hf_model.zero_grad(set_to_none=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="qwen3_vl_30b_a3b")
    p.add_argument("--layers", type=int, default=4, help="LLM layers (default 4; 0 = the flavor's own)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--samples-per-row", type=int, default=4)
    p.add_argument("--image-side", type=int, default=32, help="patches per image side (32: 1,024 patches)")
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on the GPU, fp32 on the CPU")
    p.add_argument("--hf-experts", default=None, help="transformers experts_implementation (default: grouped_mm "
                                                      "on the GPU, its default on the CPU)")
    p.add_argument("--no-hf", action="store_true", help="time ours only")
    p.add_argument("--max-loss-diff", type=float, default=None,
                   help="exit 1 when the first-step losses differ more than this (relative; default 1e-4 in fp32, "
                        "2e-2 in bf16)")
    p.add_argument("--no-parts", action="store_true", help="skip the per-part timings")
    p.add_argument("--profile", metavar="DIR", help="also profile one step of each (torch.profiler op tables in DIR)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    device = torch.device(a.device)
    if (device.type == "cuda") != torch.cuda.is_available():
        raise SystemExit("--device must be cuda exactly when a GPU is present (megatron's state follows the machine)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    start_single_process()
    cfg = reduced_config(a.flavor, a.layers or None)
    args = args_from_hf_config(cfg)
    rows = synthetic_rows(args, rows=a.microbatches, seq_length=a.seq_length, samples=a.samples_per_row,
                          side=a.image_side, seed=0)
    flops = flops_of(args, rows)
    experts_impl = a.hf_experts or ("grouped_mm" if device.type == "cuda" else "default")
    hf_model = build_hf_model(cfg, device, dtype, experts_impl)
    ours = bench_ours(hf_model, cfg, rows, device, dtype, steps=a.steps, warmup=max(a.warmup, 1),
                      parts=not a.no_parts, profile_dir=a.profile)
    gc.collect()
    reset_peak(device)
    theirs = None if a.no_hf else bench_transformers(hf_model, rows, device, steps=a.steps, warmup=a.warmup,
                                                     profile_dir=a.profile)
    synchronize(device)
    destroy_distributed()

    peak = metrics.PEAK_TFLOPS.get("H100", 989.0) * 1e12
    env = environment(device)

    def rates(step_s: float) -> dict:
        return {"tokens_per_s": flops["tokens"] / step_s, "tflops": flops["total"] / step_s / 1e12,
                "mfu": flops["total"] / step_s / peak}

    report = {"environment": env, "config": vars(a), "layers": args.text.num_hidden_layers, "flops": flops,
              "ours": {**ours, **rates(ours["step_s"])}}
    per_mb = {k: flops[k] / a.microbatches for k in ("decoder", "lm_head", "vision")}
    if "parts_s" in ours:
        report["ours"]["parts_tflops"] = {k: per_mb[k] / t / 1e12 for k, t in ours["parts_s"].items()}
    if theirs:
        report["transformers"] = {**theirs, **rates(theirs["step_s"]), "experts_implementation": experts_impl}
        report["speedup"] = theirs["step_s"] / ours["step_s"]
        report["first_loss_rel_diff"] = abs(ours["first_loss"] - theirs["first_loss"]) / abs(theirs["first_loss"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)

    print(f"# train step: {env}; {a.flavor} with {args.text.num_hidden_layers} LLM layers, {args.vision.depth} ViT "
          f"blocks, {dtype}; {a.microbatches} micro-batches x {a.seq_length} tokens ({a.samples_per_row} samples/row, "
          f"{a.image_side}x{a.image_side}-patch images)")
    print(f"# model FLOPs/step: decoder {flops['decoder'] / 1e12:.2f} T, LM head {flops['lm_head'] / 1e12:.2f} T, "
          f"vision {flops['vision'] / 1e12:.2f} T; MFU against {peak / 1e12:.0f} TFLOP/s")
    print("| run | step s | tokens/s | model TFLOP/s | MFU | peak GiB | first loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("qwenvl-mcore", report["ours"]), ("transformers", report.get("transformers"))):
        if r:
            mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            print(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {r['mfu']:.1%} "
                  f"| {mem} "
                  f"| {r['first_loss']:.4f} |")
    if "parts_tflops" in report["ours"]:
        print("| part (ours, fwd+bwd, one micro-batch) | ms | model TFLOP/s | |||")
        for k, t in ours["parts_s"].items():
            print(f"| {k} | {t * 1e3:.1f} | {report['ours']['parts_tflops'][k]:.1f} | |||")
    for name, r in (("qwenvl-mcore", ours), ("transformers", theirs)):
        if r and "profiled" in r:
            prof = r["profiled"]
            print(f"profiled {name} step: wall {prof['wall_ms']:.1f} ms, kernels {prof['kernel_ms']:.1f} "
                  f"ms ({r['profiled']['profile']})")
    if theirs:
        limit = a.max_loss_diff if a.max_loss_diff is not None else (1e-4 if dtype == torch.float32 else 2e-2)
        agree = report["first_loss_rel_diff"] <= limit
        print(f"speedup over transformers: {report['speedup']:.2f}x; first-step loss relative difference "
              f"{report['first_loss_rel_diff']:.2e} ({'within' if agree else 'OVER'} {limit:g})")
        return 0 if agree else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
