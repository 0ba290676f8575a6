"""Run transformers' Qwen3VLMoeForConditionalGeneration and our model on the same weights and inputs, at any
parallel layout, and report the differences. Used by the parity tests and by tools/convert/verify.py.

Each function here runs on every rank of an already started launch (see qwenvl_mcore.testing.dist).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwenvl_mcore.conversion import engine
from qwenvl_mcore.conversion.transforms import TRANSFORMERS5
from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config
from qwenvl_mcore.models.qwen3_vl_moe.hf_mapping import Context
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX, MultimodalInputs, Qwen3VLMoeModel, shift_labels
from qwenvl_mcore.parallel import ParallelLayout, init_distributed

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def to_inputs(batch, *, labels: bool = True) -> MultimodalInputs:
    """Processor output -> our model's inputs; labels = the input ids (pads ignored), shifted to positions."""
    kw = {k: batch[k] for k in BATCH_KEYS if k in batch and batch[k] is not None}
    inputs = MultimodalInputs(**kw)
    if labels:
        inputs.labels = shift_labels(hf_labels(batch))
    return inputs


def hf_labels(batch) -> torch.Tensor:
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return labels


def hf_forward(hf_model, batch, *, aux: bool = False):
    """transformers' logits [b, s, V] and mean LM loss (and aux loss when asked) for `batch`."""
    inputs = {k: batch[k] for k in (*BATCH_KEYS, "mm_token_type_ids") if k in batch and batch[k] is not None}
    if hasattr(hf_model.model, "rope_deltas"):
        hf_model.model.rope_deltas = None
    out = hf_model(**inputs, labels=hf_labels(batch), output_router_logits=aux, use_cache=False)
    return out


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[b, s, V/tp] -> [b, s, V] (collective over the TP group)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def build_pair(hf_model, layout: ParallelLayout, *, dtype=torch.float32, expert_layout=None):
    """Our model at `layout` holding the HF model's weights (its in-memory transformers-5 state dict)."""
    args = args_from_hf_config(hf_model.config)
    model = Qwen3VLMoeModel(args, layout, dtype=dtype)
    ctx = Context(args, expert_layout=expert_layout)
    engine.load_hf_state_dict(model, {k: v for k, v in hf_model.state_dict().items()}, ctx)
    return model, ctx


def logits_report(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> dict[str, float]:
    """max |dlogit|, cosine and top-1 agreement over attended positions."""
    ours, ref = ours.float(), ref.float()
    if mask is not None:
        keep = mask.bool()
        ours, ref = ours[keep], ref[keep]
    else:
        ours, ref = ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cos = torch.nn.functional.cosine_similarity(ours.reshape(1, -1), ref.reshape(1, -1)).item()
    return {
        "max_abs_logit_diff": (ours - ref).abs().max().item(),
        "logit_cosine": cos,
        "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def compare_forward(model, hf_model, batch) -> dict[str, float]:
    """Logits and LM loss of our model vs transformers on one batch (single pipeline stage)."""
    with torch.no_grad():
        ref = hf_forward(hf_model, batch)
        inputs = to_inputs(batch, labels=False)
        logits = gather_vocab(model(inputs))
        inputs = to_inputs(batch)
        per_token = model(inputs)
        n = (inputs.labels != IGNORE_INDEX).sum()
        loss = per_token.sum() / n
    report = logits_report(logits, ref.logits, batch.get("attention_mask"))
    report["loss_diff"] = abs(loss.item() - ref.loss.item())
    report["loss"] = loss.item()
    return report


def compare_gradients(model, hf_model, batch, ctx: Context, *, aux_coef: float = 0.0) -> dict[str, Any]:
    """One backward of (LM loss + aux_coef * aux loss) in both models; the worst relative gradient difference.

    Our gradients are reduced over TP for sequence-parallel parameters (as megatron's finalize_model_grads does),
    then gathered to full HF tensors. Relative difference = max|g - g_ref| / max(max|g_ref|, 1e-6), per tensor.
    """
    model.train()
    hf_model.train()
    model.zero_grad(set_to_none=True)
    hf_model.zero_grad(set_to_none=True)
    model.aux_loss_coeff = aux_coef
    hf_model.config.text_config.router_aux_loss_coef = aux_coef
    # transformers adds coef * load_balancing_loss to its loss when the router logits are output.
    ref = hf_forward(hf_model, batch, aux=aux_coef > 0)
    ref.loss.backward()
    inputs = to_inputs(batch)
    per_token = model(inputs)
    n = (inputs.labels != IGNORE_INDEX).sum()
    (per_token.sum() / n).backward()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) > 1:
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False) and p.grad is not None:
                dist.all_reduce(p.grad, group=tp_group)
    # transformers keeps experts in its own (transposed) layout in memory: compare in that layout.
    # Average over data parallelism as megatron's DDP does: every DP rank ran the same batch here, so dense grads
    # are replicas, while an expert on one EP rank received the tokens of every DP rank (sum over expert-DP, / DP).
    dp_group = parallel_state.get_data_parallel_group()
    edp_group = parallel_state.get_expert_data_parallel_group()
    dp = dist.get_world_size(dp_group)
    if dp > 1:
        for name, p in model.named_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=edp_group if ".mlp.experts." in name else dp_group)
                p.grad /= dp
    ours = engine.gather_hf_tensors(model, Context(ctx.args, expert_layout=TRANSFORMERS5), source="grad")
    hf_grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in hf_model.named_parameters()}
    worst, worst_name, missing = 0.0, None, sorted(set(hf_grads) - set(ours))
    for name, g in ours.items():
        r = hf_grads[name]
        rel = (g - r).abs().max().item() / max(r.abs().max().item(), 1e-6)
        if rel > worst or math.isnan(rel):
            worst, worst_name = rel, name
    aux_diff = None
    if aux_coef > 0:
        aux = model.last_aux_loss.clone()
        if model.config.sequence_parallel:
            dist.all_reduce(aux, group=tp_group)  # each TP rank holds its tokens' share
        aux_diff = abs(aux.item() - ref.aux_loss.item())
    model.eval()
    hf_model.eval()
    return {"max_rel_grad_diff": worst, "worst_param": worst_name, "compared": len(ours), "missing": missing,
            "aux_loss_diff": aux_diff}


def start(layout: ParallelLayout, seed: int = 1234) -> None:
    init_distributed(layout, seed=seed)
