"""Rank function: the ViT once per group of micro-batches (models/qwen3_vl_moe/vision_batch.py) against the ViT
once per micro-batch (vision_microbatches=1, the model's own path), on the same micro-batches.

Run alone on one rank (tests/unit/test_vision_batch.py) and inside the parity launches of tp1_ep1 and
pp2_tp2_ep2_sp (PP2 with 1F1B, TP2 x EP2 with sequence parallelism; tests/multirank/test_parity.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwenvl_mcore.testing import parity

# four micro-batches of two rows each (one shape for the pipeline): images and videos interleaved across rows and
# inside a row, a micro-batch without any image, and images alone
MICROBATCH_KINDS = (("video", "image"), ("text", "text"), ("image_video", "image"), ("image", "video"))
SETTINGS = (0, 2, 3)  # all four in one ViT call; groups of two; groups of three and one (uneven)


def microbatches(processor, args):
    """MICROBATCH_KINDS as collated micro-batches of one length (the pipeline needs one shape)."""
    from qwenvl_mcore.data.collate import collate
    from qwenvl_mcore.data.synthetic import SyntheticConversations

    samples = [[SyntheticConversations(processor, 1, kinds=(kind,), seed=11 + 3 * i + j, max_words=5)[0]
                for j, kind in enumerate(kinds)] for i, kinds in enumerate(MICROBATCH_KINDS)]
    length = max(len(s) for pair in samples for s in pair)
    length += (-length) % 4
    return [collate(pair, length, processor.tokenizer.pad_token_id) for pair in samples]


def _set(chunks, value: int) -> None:
    for c in chunks:
        parity_unwrap(c).vision_microbatches = value


def parity_unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _vit_counter(chunks):
    """(a list that gets one entry per ViT forward on this rank, the hooks to remove)."""
    calls = []
    model = parity_unwrap(chunks[0])
    hooks = [model.vision.register_forward_hook(lambda *_: calls.append(1))] if model.pre_process else []
    return calls, hooks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def gradient_checks(chunks, micro) -> dict:
    """Gradients of the summed token losses through run_microbatches: for each of SETTINGS against
    vision_microbatches=1, the worst relative difference over this rank's parameters (ViT ones apart), the loss
    sums' difference (last stage), and the ViT calls made."""
    from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches

    configs = {id(c.config): c.config for c in chunks}.values()
    saved = [cfg.calculate_per_token_loss for cfg in configs]
    calls, hooks = _vit_counter(chunks)

    def run(value: int):
        _set(chunks, value)
        for c in chunks:
            c.train()
            c.zero_grad(set_to_none=True)
        calls.clear()
        reports = run_microbatches(chunks, micro, forward_only=False, loss_for=loss_for_per_token)
        grads = {f"{i}.{n}": (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                 for i, c in enumerate(chunks) for n, p in c.named_parameters()}
        return grads, [float(r["loss_sum"]) for r in reports], len(calls)

    out = {"settings": {}}
    try:
        for cfg in configs:
            cfg.calculate_per_token_loss = True
        ref, ref_loss, out["calls_per_microbatch"] = run(1)
        out["vision_params"] = sum(1 for n in ref if ".vision." in n)
        out["vision_grad_max"] = max((float(g.abs().max()) for n, g in ref.items() if ".vision." in n), default=0.0)
        for value in SETTINGS:
            grads, loss, n_calls = run(value)
            vit = [_rel(grads[n], ref[n]) for n in ref if ".vision." in n]
            rest = [_rel(grads[n], ref[n]) for n in ref if ".vision." not in n]
            out["settings"][value] = {
                "vision_rel": max(vit, default=0.0), "other_rel": max(rest, default=0.0),
                "loss_diff": max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(loss, ref_loss)), default=0.0),
                "losses": len(loss), "calls": n_calls}
    finally:
        for h in hooks:
            h.remove()
        for cfg, value in zip(configs, saved):
            cfg.calculate_per_token_loss = value
        _set(chunks, 0)
        for c in chunks:
            c.zero_grad(set_to_none=True)
            c.eval()
    return out


def feature_checks(chunks, micro) -> dict | None:
    """On the rank holding the ViT: each micro-batch's features from one ViT call over all four against the
    model's own per-micro-batch ViT (no autograd): worst relative difference, merged and DeepStack."""
    from qwenvl_mcore.models.qwen3_vl_moe.vision_batch import VisionBatches

    model = parity_unwrap(chunks[0])
    if not model.pre_process:
        return None
    a = model.args
    worst, compared = 0.0, 0
    with torch.no_grad():
        batches = VisionBatches(micro, 0, image_token_id=a.image_token_id, video_token_id=a.video_token_id,
                                merge_size=a.vision.spatial_merge_size, grad=False)
        for i, mb in enumerate(micro):
            got = batches.features(i, model.vision)
            ref = model._visual_features(mb, mb.input_ids.cpu())
            if ref is None:
                assert got is None
                continue
            _, merged, deep = ref
            for x, y in zip([got.merged, *got.deepstack], [merged, *deep], strict=True):
                worst = max(worst, _rel(x, y))
                compared += 1
    return {"feature_rel": worst, "compared": compared, "calls": batches.calls}


def step_checks(hf, layout, micro, settings=(1, 0, 2)) -> dict:
    """Two whole training steps (training.step.train_step: DDP, distributed Adam, finalize_model_grads) from the
    same weights for each of `settings`: losses, grad norms and aux losses per step."""
    from qwenvl_mcore.training.setup import OptimSettings, build_optimizer, wrap_ddp
    from qwenvl_mcore.training.step import train_step

    out = {}
    for value in settings:
        chunks, _ = parity.build_pair(hf, layout)
        _set(chunks, value)
        chunks = wrap_ddp(chunks, distributed_optimizer=True)
        optimizer, _ = build_optimizer(chunks, OptimSettings(lr=1e-3, clip_grad=1.0), steps=4)
        for c in chunks:
            c.train()
        steps = [train_step(chunks, optimizer, micro) for _ in range(2)]
        out[value] = [(s.loss, s.grad_norm, s.aux_loss) for s in steps]
    return out


def vision_batch_checks(chunks, hf, processor, layout) -> dict:
    """All of the above at this rank's layout (megatron's parallel state started for it)."""
    micro = microbatches(processor, parity_unwrap(chunks[0]).args)
    res = {"gradients": gradient_checks(chunks, micro), "features": feature_checks(chunks, micro),
           "steps": step_checks(hf, layout, micro),
           "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
           "world": dist.get_world_size()}
    return res
