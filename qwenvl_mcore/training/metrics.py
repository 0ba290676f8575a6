"""What a step reports: model FLOPs by Megatron-LM's formula (../shared/notes/performance.md), MFU, memory,
and the writers (console line, progress bar, metrics.jsonl, tensorboard, wandb) on the logging rank."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Sequence

import torch

from qwenvl_mcore.models.qwen3_vl_moe.config import Qwen3VLMoeArgs
from qwenvl_mcore.training.lora_sites import LoRAShape, language_layer_sites, merger_sites, vision_block_sites

# Dense bf16 peak per device (TFLOP/s), matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "B200": 2250.0,
               "GB200": 2450.0}


def language_flops(args: Qwen3VLMoeArgs, sample_lengths: Sequence[int], *, lora: LoRAShape | None = None) -> float:
    """Forward + backward model FLOPs of the LLM for sequences of these real (unpadded) lengths.

    Per layer and token 6h(q + 2gd) + 6qh (attention projections) + 6h F k 3 (routed SwiGLU experts), the LM head
    6hV per token, and causal core attention 6q L^2 per layer and sequence; no recompute counted.
    With `lora` (peft=lora: a frozen base) see `lora_language_flops`.
    """
    if lora is not None:
        return lora_language_flops(args, sample_lengths, lora)
    t = args.text
    h, q, gd = t.hidden_size, t.head_dim * t.num_attention_heads, t.head_dim * t.num_key_value_heads
    per_layer = 6 * h * (q + 2 * gd) + 6 * q * h + 6 * h * t.moe_intermediate_size * t.num_experts_per_tok * 3
    tokens = sum(sample_lengths)
    attention = t.num_hidden_layers * 6 * q * sum(n * n for n in sample_lengths)
    return float(tokens * (t.num_hidden_layers * per_layer + 6 * h * t.vocab_size) + attention)


def lora_language_flops(args: Qwen3VLMoeArgs, sample_lengths: Sequence[int], lora: LoRAShape) -> float:
    """`language_flops` of a LoRA step: the frozen base computes no weight gradients, only the input gradients
    that carry the loss back to the adapters (every layer needs them: the visual features enter at layer 0), so
    each base GEMM counts 2 + 2 (forward, input gradient) instead of 2 + 2 + 2 FLOPs per multiply-add:
      per layer and token 4h(q + 2gd) + 4qh + 4h F k 3, the LM head 4hV per token,
      causal core attention unchanged, 6q L^2 per layer and sequence (its backward has no weights),
    plus each adapter of the layer, 6r(in + out) per token (k per token for the experts'; `lora_sites`)."""
    t = args.text
    h, q, gd = t.hidden_size, t.head_dim * t.num_attention_heads, t.head_dim * t.num_key_value_heads
    base = 4 * h * (q + 2 * gd) + 4 * q * h + 4 * h * t.moe_intermediate_size * t.num_experts_per_tok * 3
    adapters = sum(site.flops_per_token(lora.rank) for site in language_layer_sites(args, lora.kinds))
    tokens = sum(sample_lengths)
    attention = t.num_hidden_layers * 6 * q * sum(n * n for n in sample_lengths)
    return float(tokens * (t.num_hidden_layers * (base + adapters) + 4 * h * t.vocab_size) + attention)


def lm_head_flops(args: Qwen3VLMoeArgs, tokens: int) -> float:
    """The LM head's share of `language_flops`: 6 h V per token (the rest is the decoder layers)."""
    return float(tokens * 6 * args.text.hidden_size * args.text.vocab_size)


def vision_flops(args: Qwen3VLMoeArgs, grids: torch.Tensor | None, *, vit_trains: bool = True,
                 merger_trains: bool = True, lora: LoRAShape | None = None) -> float:
    """Model FLOPs of the ViT and its mergers for images/videos of these grid_thw rows ([n, 3]); frozen parts
    run forward only (x1 instead of x3). Attention is per frame (h*w patches) as Qwen3-VL's ViT does.

    With `lora` (peft=lora; vit_trains and merger_trains are then ignored: the targets decide) the base runs
    forward, plus the input gradients that reach an adapter: with ViT adapters the blocks' linears x2 and their
    core attention x3 and both merger linears x2; with merger adapters only, the ViT x1, merger fc2 x2 (its input
    gradient reaches fc1's adapter) and fc1 x1; without either, x1. Plus 6r(in + out) per patch (per merged token
    for the mergers) for each adapter."""
    if grids is None or grids.numel() == 0:
        return 0.0
    v = args.vision
    hv = v.hidden_size
    patches = float(grids.prod(-1).sum())
    per_frame = (grids[:, 1] * grids[:, 2]).double()
    attention = float((grids[:, 0].double() * per_frame * per_frame).sum())
    merged = patches / v.spatial_merge_size**2
    wide = v.merged_hidden_size
    n_mergers = 1 + len(v.deepstack_visual_indexes)
    if lora is not None:
        vit_linears = v.depth * (8 * hv * hv + 4 * hv * v.intermediate_size) * patches
        vit_attention = v.depth * 4 * hv * attention
        fc1, fc2 = n_mergers * 2 * merged * wide * wide, n_mergers * 2 * merged * wide * v.out_hidden_size
        vt, mt = lora.vision_trains, lora.merger_trains
        base = ((2 if vt else 1) * vit_linears + (3 if vt else 1) * vit_attention + (2 if vt else 1) * fc1
                + (2 if vt or mt else 1) * fc2)
        adapters = (v.depth * patches * sum(s.flops_per_token(lora.rank) for s in vision_block_sites(args, lora.kinds))
                    + n_mergers * merged * sum(s.flops_per_token(lora.rank) for s in merger_sites(args, lora.kinds)))
        return float(base + adapters)
    vit = v.depth * ((8 * hv * hv + 4 * hv * v.intermediate_size) * patches + 4 * hv * attention)
    mergers = n_mergers * 2 * merged * (wide * wide + wide * v.out_hidden_size)
    return (3 if vit_trains else 1) * vit + (3 if merger_trains else 1) * mergers


def peak_tflops(configured: float | None) -> float | None:
    """The per-device peak for MFU: the configured value, else a known GPU's bf16 dense peak, else None."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def memory_gib() -> float:
    """Peak GPU memory allocated by this process, or its resident set size on the CPU (GiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class MetricsWriter:
    """Per-step metrics to metrics.jsonl (every step), and every `every` steps to the console, tensorboard and
    wandb; a tqdm progress bar with ETA. Only the logging rank (global rank 0) creates one."""

    def __init__(self, log_dir: str, *, every: int, progress_bar: bool, tensorboard: bool, wandb: bool,
                 wandb_project: str, wandb_mode: str, run_name: str, config: dict, start_step: int, total_steps: int):
        os.makedirs(log_dir, exist_ok=True)
        self.every = every
        self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        self.wandb = None
        if wandb:
            import wandb as wandb_lib

            self.wandb = wandb_lib.init(project=wandb_project, name=run_name, mode=wandb_mode, config=config,
                                        dir=log_dir, resume="allow")
        self.bar = None
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log(self, step: int, metrics: dict, *, kind: str = "train") -> None:
        record = {"kind": kind, "step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if kind == "train" and self.bar is not None:
            self.bar.update(1)
            if metrics.get("loss") is not None:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if kind == "train" and step % self.every:
            return
        scalars = _scalars(metrics, kind)
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        self._print(format_line(step, metrics, kind))

    def message(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()


def _scalars(metrics: dict, kind: str) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if key == "expert_load" and value is not None:
            for layer, ratio in enumerate(value):
                out[f"expert_load/layer_{layer:03d}_max_over_mean"] = float(ratio)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[f"{kind}/{key}"] = float(value)
    return out


def format_line(step: int, m: dict, kind: str) -> str:
    if kind != "train":
        return f"[{kind}] step {step}: loss {m['loss']:.4f} over {m['tokens']} tokens"
    if m.get("empty"):
        skipped = ", ".join(f"{n} {reason}" for reason, n in (m.get("data_skips_step") or {}).items())
        return (f"step {step} | no loss tokens: every sample was skipped ({skipped or 'none'}); nothing changed | "
                f"empty steps {m.get('empty_steps')}")
    parts = [f"step {step}", f"loss {m['loss']:.4f}"]
    if m.get("aux_loss") is not None:
        parts.append(f"aux {m['aux_loss']:.4f}")
    parts.append(f"lr {m['lr']:.3g}")
    parts.append("grad norm " + ("skipped" if m.get("grad_norm") is None else f"{m['grad_norm']:.3f}"))
    parts.append(f"{m['tokens_per_s']:.0f} tok/s")
    parts.append(f"{m['tflops_per_device']:.3g} TFLOP/s/dev")
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"mem {m['memory_gib']:.2f} GiB")
    if m.get("expert_load"):
        parts.append(f"expert load max/mean {max(m['expert_load']):.2f}")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    return " | ".join(parts)
