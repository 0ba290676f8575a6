"""One training step of a depth-reduced Qwen3-VL MoE on one device, ours against transformers on the same weights
and batch.

    python tools/bench/train_step.py [--flavor qwen3_vl_30b_a3b] [--layers 4] [--seq-length 4096]
        [--samples-per-row 4] [--image-side 32] [--microbatches 2] [--steps 4] [--warmup 2] [--json out.json]
        [--profile DIR] [--check-parts] [--no-parts] [--no-sync-count] [--no-hf]

The model is the released config with `--layers` LLM layers (real widths, all experts, top-k as released) and the
full vision tower; the DeepStack taps are kept while there are layers for them. Each micro-batch is one packed row
of `--seq-length` tokens holding `--samples-per-row` samples, each with one image of side x side patches (32 x 32 =
1,024 patches, 256 visual tokens) and random text, trained on the text.

Ours: the trainer's own step (`training.step.train_step`: megatron DDP, distributed optimizer with fp32 main
weights, per-token loss, aux loss), bf16 on the GPU, grouped-GEMM experts, varlen flash attention. Also timed apart
(forward + backward of one micro-batch): the decoder layers, the LM head with the loss, the vision tower.
transformers: `Qwen3VLMoeForConditionalGeneration` in bf16, sdpa attention, `--hf-experts` (grouped_mm), torch's
fused AdamW, the same micro-batches (its packed-sequence mask from per-sample position ids; router aux loss on).

Measured, besides the step time (median of `--steps`):
- parts (ours, forward + backward of one micro-batch, unless `--no-parts`): the decoder layers, the LM head with
  the trainer's loss, the vision tower; each twice: "ddp" on the DDP-wrapped parameters as in training (megatron
  DDP's gradient hooks add every weight gradient into its fp32 `main_grad`), and "no ddp" with the same weight
  gradients computed and returned by `torch.autograd.grad` (no accumulation hooks fire). `--check-parts` also checks
  that both give the same weight gradients (`parts_grad_max_rel_diff`: 0 on the CPU in fp32);
- host syncs and aten calls of one whole step of each side (`host_overhead.SyncCounter`: what blocks the host on a
  GPU, by op and call site; on a GPU also `torch.cuda.set_sync_debug_mode` warnings of one step), unless
  `--no-sync-count`;
- with `--profile DIR`: one step of each under torch.profiler. On a GPU, first with device activity only (little
  host overhead): `kernel_ms` sums the device events (kernels, memcpy, memset; not the op rows, which repeat their
  kernels' time, nor annotations), `busy_ms` is the union of their intervals, `gpu_busy` = busy_ms / wall time of
  that profiled step; then with CPU and device activity for the op table written to DIR (by self device time).
A failed extra measurement is reported in the JSON (`error`) and printed, and makes the exit status 1; the others
are kept.

Printed: tokens/s, model TFLOP/s and MFU (Megatron-LM's formula, training.metrics; LM head and vision apart), peak
memory, the first-step loss of both (same weights and data: they must agree), the speed ratio (ours' tokens/s over
transformers'), the parts with and without DDP accumulation, syncs and GPU-busy fraction. The table is the last
thing printed. `--json` gets ours' figures before transformers runs (a run stopped by a time limit keeps them), and
a transformers step that runs out of GPU memory is reported there as such (`transformers.error`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, peak_gib, reset_peak, start_single_process, synchronize, time_call  # noqa: E402

from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionContext, RotaryTables  # noqa: E402
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


def head_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The LM head and the loss as the model's forward computes them, summed over the loss tokens (`labels` [s, b],
    IGNORE_INDEX where there is none): the row-chunked head where the model uses it (`lm_loss.token_losses`),
    else the logits and torch's fused cross-entropy on their fp32 copy at TP1, megatron's vocab-parallel one above."""
    chunked = getattr(model, "_chunked_loss", None)
    if chunked is not None and chunked():
        from qwenvl_mcore.models.qwen3_vl_moe.lm_loss import token_losses

        return token_losses(hidden, model.output_layer.weight, labels, IGNORE_INDEX, model.loss_chunk_tokens).sum()
    logits, _ = model.output_layer(hidden)
    if model.config.tensor_model_parallel_size == 1:
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ignore = labels == IGNORE_INDEX
    return vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(ignore, 0)).masked_fill(ignore, 0).sum()


def part_runs(model, args, batch: MultimodalInputs, device) -> dict:
    """For the decoder layers, the LM head + loss and the vision tower of one micro-batch: (forward, its module, its
    input that needs a gradient or None); forward() gives (outputs, output gradients)."""
    s = batch.input_ids.shape[1]
    dtype = model.config.params_dtype
    g = torch.Generator().manual_seed(1)
    positions = model.position_ids(batch).to(device)
    # what the model's forward passes its decoder: the segments and the rotary tables, built once per forward
    context = AttentionContext(packed_attention_segments(batch.cu_seqlens, s, device=device),
                               RotaryTables(model.rotary(positions), dtype))
    hidden = (torch.randn(s, 1, args.text.hidden_size, generator=g) * 0.5).to(device, dtype).requires_grad_()
    grad = torch.randn(s, 1, args.text.hidden_size, generator=g).to(device, dtype)
    labels = batch.labels.transpose(0, 1).to(device)
    pixels, grid = batch.pixel_values.to(device), batch.image_grid_thw

    def decoder():
        return [model.decoder(hidden, attention_mask=context, rotary_pos_emb=None)], [grad]

    def head():
        return [head_loss(model, hidden, labels)], [None]

    def vision():
        merged, deep = model.vision(pixels, grid)
        outputs = [merged, *deep]
        return outputs, [torch.ones_like(o) for o in outputs]

    return {"decoder": (decoder, model.decoder, hidden), "lm_head": (head, model.output_layer, hidden),
            "vision": (vision, model.vision, None)}


def _trainable(module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def with_ddp(forward):
    """Backward into the DDP-wrapped parameters, as in training: megatron DDP's hooks add each weight gradient
    into its fp32 main_grad."""
    def run():
        outputs, grads = forward()
        torch.autograd.backward(outputs, grads)

    return run


def without_ddp(forward, module, leaf):
    """The same weight (and input) gradients, returned by autograd.grad instead of accumulated: the parameters'
    AccumulateGrad nodes, which carry megatron DDP's hooks, do not run."""
    inputs = ([] if leaf is None else [leaf]) + _trainable(module)

    def run():
        outputs, grads = forward()
        return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)

    return run


def check_parts(runs: dict) -> dict:
    """Largest relative difference, per part, between the weight gradients DDP accumulates (main_grad, zeroed
    first) and the ones autograd.grad returns (a parameter without a gradient must have a zero main_grad; inf when
    no parameter got one)."""
    worst = {}
    for name, (forward, module, leaf) in runs.items():
        params = _trainable(module)
        for p in params:
            p.main_grad.zero_()
        with_ddp(forward)()
        grads = without_ddp(forward, module, leaf)()[0 if leaf is None else 1:]
        diff, compared = 0.0, 0
        for p, g in zip(params, grads):
            ref = p.main_grad.float()
            if g is None:
                diff = max(diff, 0.0 if bool((ref == 0).all()) else float("inf"))
                continue
            compared += 1
            diff = max(diff, float((g.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        worst[name] = diff if compared else float("inf")
    return worst


def bench_parts(model, args, batch: MultimodalInputs, device, *, warmup: int, iters: int,
                check: bool = False) -> dict:
    """Forward + backward of the decoder layers, the LM head + loss, and the vision tower alone (one micro-batch),
    with and without DDP's gradient accumulation: {"ddp": {part: s}, "no_ddp": {part: s}}."""
    runs = part_runs(model, args, batch, device)
    out = {"ddp": {}, "no_ddp": {}}
    for name, (forward, module, leaf) in runs.items():
        out["ddp"][name] = time_call(with_ddp(forward), device, warmup=warmup, iters=iters)["median_s"]
        out["no_ddp"][name] = time_call(without_ddp(forward, module, leaf), device, warmup=warmup,
                                        iters=iters)["median_s"]
    if check:
        out["grad_max_rel_diff"] = check_parts(runs)
    return out


_DEVICE_TYPES = tuple(getattr(torch.autograd.DeviceType, n) for n in ("CUDA", "PrivateUse1", "XPU", "MTIA", "HIP")
                      if hasattr(torch.autograd.DeviceType, n))


def device_time(events) -> dict | None:
    """Device work among profiler events (FunctionEvent-like: device_type, is_user_annotation, time_range): the
    kernels, copies and memsets, not the annotations that span them (torch's own rule for its table's device
    total). {"kernel_ms": summed durations, "busy_ms": union of their intervals, "span_ms": first start to last
    end, "events": how many}; None when there is none (a CPU run)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type in _DEVICE_TYPES and not getattr(e, "is_user_annotation", False))
    if not spans:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy += hi - lo
            lo, hi = a, b
        else:
            hi = max(hi, b)
    busy += hi - lo
    return {"kernel_ms": sum(b - a for a, b in spans) / 1e3, "busy_ms": busy / 1e3,
            "span_ms": (max(b for _, b in spans) - spans[0][0]) / 1e3, "events": len(spans)}


def _timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def profiled(fn, path: str, device) -> dict:
    """One step under torch.profiler. On a GPU first with device activity only: its kernel time, the union of its
    kernel intervals and the GPU-busy fraction (that union over the profiled step's wall time); then with CPU (and
    device) activity, for the op table (by self device time on a GPU, self CPU time elsewhere) written to `path`,
    whose device events give the same figures under the heavier profiler (`table_*`; used for the headline when the
    device-only pass fails). On the CPU the device figures are None."""
    from torch.profiler import ProfilerActivity, profile

    result = {"profile": path, "wall_ms": None, "kernel_ms": None, "busy_ms": None, "gpu_busy": None}
    cuda = device.type == "cuda"
    if cuda:
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                wall_s = _timed(fn, device)
            work = device_time(prof.events())
            if work is None:
                raise RuntimeError("the device-only profile of the step holds no device events")
            result.update(work, wall_ms=wall_s * 1e3, gpu_busy=work["busy_ms"] / (wall_s * 1e3))
        except Exception as e:  # noqa: BLE001 - reported; the table pass below still gives the figures
            result["device_only_error"] = f"{type(e).__name__}: {e}"[:1000]
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        result["table_wall_ms"] = _timed(fn, device) * 1e3
    if cuda:
        work = device_time(prof.events())
        if work is None:
            raise RuntimeError("the CUDA profile of the step holds no device events")
        result.update({f"table_{k}": v for k, v in work.items()},
                      table_gpu_busy=work["busy_ms"] / result["table_wall_ms"])
        if result["gpu_busy"] is None:
            result.update(work, wall_ms=result["table_wall_ms"], gpu_busy=result["table_gpu_busy"])
    events = prof.key_averages()
    sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    result["table_self_cpu_ms"] = sum(e.self_cpu_time_total for e in events) / 1e3
    with open(path, "w") as f:
        f.write(events.table(sort_by=sort if cuda else "self_cpu_time_total", row_limit=60))
    return result


def _site(filename: str, lineno: int) -> str:
    for marker in ("site-packages/", "qwenvl_mcore/", "tools/bench/"):
        if marker in filename:
            filename = ("" if marker == "site-packages/" else marker) + filename.split(marker, 1)[1]
            break
    return f"{filename}:{lineno}"


def count_step(fn, device, host=()) -> dict:
    """Aten calls and host syncs of one fn() (a whole training step): `host_overhead.SyncCounter`'s counts (what
    would block the host on a GPU; `host` are the tensors the trainer keeps on the host) and, on a GPU, the
    synchronizing CUDA calls torch's sync debug mode warns about in one more step (`cuda_sync_warnings`)."""
    from host_overhead import SyncCounter  # imports this module: imported here, not at the top

    with SyncCounter(host) as counter:
        fn()
    synchronize(device)
    result = {"aten_calls": counter.aten_calls, "host_syncs": counter.host_syncs,
              "syncs_by_op": dict(counter.syncs.most_common()), "sync_sites": dict(counter.sites.most_common(10)),
              "cuda_sync_warnings": None}
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
                synchronize(device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = Counter(_site(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message).lower())
        result["cuda_sync_warnings"] = sum(sites.values())
        result["cuda_sync_sites"] = dict(sites.most_common(10))
    return result


def attempt(fn):
    """fn(), or {"error": ...} when it raises: a failed extra measurement (profile, sync count, parts) is reported
    (and makes the exit status 1) without losing the step's other figures."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded in the report
        if isinstance(e, torch.cuda.OutOfMemoryError):
            gc.collect()
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {e}"[:1000]}


def bench_ours(hf_model, cfg, rows, device, dtype, *, steps: int, warmup: int, parts: bool,
               profile_dir: str | None = None, sync_count: bool = True, check: bool = False) -> dict:
    from qwenvl_mcore.testing.parity import build_pair

    args = args_from_hf_config(cfg)
    chunks, _ = build_pair(hf_model, ParallelLayout(), dtype=dtype)
    hf_model.to("cpu")  # the weights now live in ours; keep the device for one model at a time
    reset_peak(device)
    chunks = wrap_ddp(chunks, distributed_optimizer=True)
    optimizer, _ = build_optimizer(chunks, OptimSettings(lr=1e-5, clip_grad=1.0), steps=steps + warmup + 4)
    for c in chunks:
        c.train()
    # pixels on the device up front, as transformers gets its whole batch (a trainer would prefetch them); the token
    # ids stay on the host, where the model computes the packed MRoPE positions from them
    micro = [replace(ours, pixel_values=ours.pixel_values.to(device)) for ours, _ in rows]

    def step():
        train_step(chunks, optimizer, micro)

    first = train_step(chunks, optimizer, micro)
    result = {"first_loss": first.loss, "first_aux_loss": first.aux_loss}
    result["step_s"] = time_call(step, device, warmup=warmup - 1, iters=steps)["median_s"]
    result["peak_gib"] = peak_gib(device)
    if profile_dir:
        result["profiled"] = attempt(lambda: profiled(step, os.path.join(profile_dir, "ours_step.txt"), device))
    if sync_count:
        host = [t for m in micro for t in (m.input_ids, m.labels, m.cu_seqlens, m.image_grid_thw)
                if isinstance(t, torch.Tensor)]  # what the trainer keeps on the host (as host_overhead.py does)
        result["counts"] = attempt(lambda: count_step(step, device, host))
    if parts:
        measured = attempt(lambda: bench_parts(unwrap(chunks[0]), args, micro[0], device, warmup=1,
                                               iters=max(steps, 3), check=check))
        if "error" in measured:
            result["parts_error"] = measured["error"]
        else:
            result["parts_s"], result["parts_no_ddp_s"] = measured["ddp"], measured["no_ddp"]
            if check:
                result["parts_grad_max_rel_diff"] = measured["grad_max_rel_diff"]
    return result  # the model and optimizer are freed with this frame (main collects)


def bench_transformers(hf_model, rows, device, *, steps: int, warmup: int, profile_dir: str | None = None,
                       sync_count: bool = True) -> dict:
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
        result["profiled"] = attempt(lambda: profiled(step, os.path.join(profile_dir, "transformers_step.txt"),
                                                      device))
    if sync_count:
        result["counts"] = attempt(lambda: count_step(step, device))  # its whole batch is on the device
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
    p.add_argument("--check-parts", action="store_true",
                   help="also check that the parts with and without DDP accumulation give the same weight gradients")
    p.add_argument("--no-sync-count", action="store_true", help="skip counting host syncs and aten calls of a step")
    p.add_argument("--profile", metavar="DIR", help="also profile one step of each (torch.profiler op tables in DIR; "
                                                    "GPU-busy fraction on a GPU)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    device = torch.device(a.device)
    if (device.type == "cuda") != torch.cuda.is_available():
        raise SystemExit("--device must be cuda exactly when a GPU is present (megatron's state follows the machine)")
    if a.check_parts and a.no_parts:
        raise SystemExit("--check-parts checks the parts: drop --no-parts")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    start_single_process()
    cfg = reduced_config(a.flavor, a.layers or None)
    args = args_from_hf_config(cfg)
    rows = synthetic_rows(args, rows=a.microbatches, seq_length=a.seq_length, samples=a.samples_per_row,
                          side=a.image_side, seed=0)
    flops = flops_of(args, rows)
    experts_impl = a.hf_experts or ("grouped_mm" if device.type == "cuda" else "default")
    hf_model = build_hf_model(cfg, device, dtype, experts_impl)
    peak = metrics.PEAK_TFLOPS.get("H100", 989.0) * 1e12
    env = environment(device)
    limit = a.max_loss_diff if a.max_loss_diff is not None else (1e-4 if dtype == torch.float32 else 2e-2)

    def rates(step_s: float) -> dict:
        return {"tokens_per_s": flops["tokens"] / step_s, "tflops": flops["total"] / step_s / 1e12,
                "mfu": flops["total"] / step_s / peak}

    def busy(r: dict) -> dict:
        return {"gpu_busy": (r.get("profiled") or {}).get("gpu_busy")}

    def assemble(ours: dict, theirs: dict | None) -> dict:
        report = {"environment": env, "config": vars(a), "layers": args.text.num_hidden_layers, "flops": flops,
                  "ours": {**ours, **rates(ours["step_s"]), **busy(ours)}}
        per_mb = {k: flops[k] / a.microbatches for k in ("decoder", "lm_head", "vision")}
        for key in ("parts", "parts_no_ddp"):
            if f"{key}_s" in ours:
                report["ours"][f"{key}_tflops"] = {k: per_mb[k] / t / 1e12 for k, t in ours[f"{key}_s"].items()}
        if theirs and "error" not in theirs:
            report["transformers"] = {**theirs, **rates(theirs["step_s"]), **busy(theirs),
                                      "experts_implementation": experts_impl}
            report["speedup"] = theirs["step_s"] / ours["step_s"]  # = ours' tokens/s over transformers' (same tokens)
            report["first_loss_rel_diff"] = abs(ours["first_loss"] - theirs["first_loss"]) / abs(theirs["first_loss"])
            report["first_loss_limit"] = limit
        elif theirs:
            report["transformers"] = {**theirs, "experts_implementation": experts_impl}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
        return report

    ours = bench_ours(hf_model, cfg, rows, device, dtype, steps=a.steps, warmup=max(a.warmup, 1),
                      parts=not a.no_parts, profile_dir=a.profile, sync_count=not a.no_sync_count,
                      check=a.check_parts)
    theirs = None
    if not a.no_hf:
        # ours' figures on disk before transformers runs: a run stopped by a time limit keeps them
        assemble(ours, {"error": "not measured (the run stopped before transformers' step was timed)"})
        gc.collect()
        reset_peak(device)
        try:
            theirs = bench_transformers(hf_model, rows, device, steps=a.steps, warmup=a.warmup,
                                        profile_dir=a.profile, sync_count=not a.no_sync_count)
        except torch.cuda.OutOfMemoryError as e:  # ours' figures are kept; the report says what happened
            theirs = {"error": f"out of GPU memory: {str(e).splitlines()[0]}"}
            gc.collect()
            torch.cuda.empty_cache()
    synchronize(device)
    destroy_distributed()
    report = assemble(ours, theirs)
    ok = theirs is None or "error" not in theirs
    print_report(report, a, args, dtype, peak)
    errors = [f"{side} {key}: {r[key]['error'] if isinstance(r[key], dict) else r[key]}"
              for side, r in (("ours", ours), ("transformers", theirs)) if r
              for key in ("profiled", "counts", "parts_error", "error")
              if key in r and (key in ("parts_error", "error") or "error" in r[key])]
    for line in errors:
        print(f"FAILED {line}")
    if theirs and not ok:
        return 1
    if theirs:
        agree = report["first_loss_rel_diff"] <= limit
        print(f"speedup over transformers: {report['speedup']:.2f}x; first-step loss relative difference "
              f"{report['first_loss_rel_diff']:.2e} ({'within' if agree else 'OVER'} {limit:g})")
        return 0 if agree and not errors else 1
    return 1 if errors else 0


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_report(report: dict, a, args, dtype, peak: float) -> None:
    flops, env, ours = report["flops"], report["environment"], report["ours"]
    theirs = report.get("transformers")
    print(f"# train step: {env}; {a.flavor} with {args.text.num_hidden_layers} LLM layers, {args.vision.depth} ViT "
          f"blocks, {dtype}; {a.microbatches} micro-batches x {a.seq_length} tokens ({a.samples_per_row} samples/row, "
          f"{a.image_side}x{a.image_side}-patch images)")
    print(f"# model FLOPs/step: decoder {flops['decoder'] / 1e12:.2f} T, LM head {flops['lm_head'] / 1e12:.2f} T, "
          f"vision {flops['vision'] / 1e12:.2f} T; MFU against {peak / 1e12:.0f} TFLOP/s")
    for name, r in (("qwenvl-mcore", ours), ("transformers", theirs)):
        c = (r or {}).get("counts")
        if c and "error" not in c:
            print(f"# {name} host syncs by op: " + (", ".join(f"{k} {v}" for k, v in c["syncs_by_op"].items())
                                                     or "none"))
            if c.get("cuda_sync_sites"):
                print(f"# {name} synchronizing CUDA calls (sync debug mode) by site: "
                      + ", ".join(f"{k} {v}" for k, v in c["cuda_sync_sites"].items()))
        if r and "profiled" in r and "error" not in r["profiled"]:
            p = r["profiled"]
            print(f"# profiled {name} step: " + (
                f"wall {p['wall_ms']:.1f} ms, kernels {p['kernel_ms']:.1f} ms, busy (union) {p['busy_ms']:.1f} ms "
                f"= {p['gpu_busy']:.1%}; " if p["gpu_busy"] is not None else "")
                + f"op table {p['profile']} (wall {p['table_wall_ms']:.1f} ms with CPU activity)"
                + (f"; device-only pass failed: {p['device_only_error']}" if "device_only_error" in p else ""))
    print("| run | step s | tokens/s | model TFLOP/s | MFU | peak GiB | first loss | GPU busy | host syncs/step "
          "| aten calls/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in (("qwenvl-mcore", ours), ("transformers", theirs)):
        if r and "step_s" in r:
            c = r.get("counts") or {}
            print(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {r['mfu']:.1%} "
                  f"| {_fmt(r['peak_gib'], '.1f')} | {r['first_loss']:.4f} | {_fmt(r['gpu_busy'], '.1%')} "
                  f"| {_fmt(c.get('host_syncs'), 'd')} | {_fmt(c.get('aten_calls'), 'd')} |")
    if "parts_s" in ours:
        print("| part (ours, fwd+bwd, one micro-batch) | ms, DDP accumulation | model TFLOP/s | ms, without "
              "| model TFLOP/s |")
        print("|---|---|---|---|---|")
        for k, t in ours["parts_s"].items():
            t0 = ours["parts_no_ddp_s"][k]
            print(f"| {k} | {t * 1e3:.1f} | {ours['parts_tflops'][k]:.1f} | {t0 * 1e3:.1f} "
                  f"| {ours['parts_no_ddp_tflops'][k]:.1f} |")
        if "parts_grad_max_rel_diff" in ours:
            print("# parts' weight gradients, with against without DDP accumulation, max relative difference: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in ours["parts_grad_max_rel_diff"].items()))


if __name__ == "__main__":
    sys.exit(main())
