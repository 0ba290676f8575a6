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
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX, MultimodalInputs, build_model_chunks, shift_labels
from qwenvl_mcore.parallel import ParallelLayout, init_distributed
from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches

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
    """Our model chunks at `layout` (one per virtual pipeline stage) holding the HF model's weights (its
    in-memory transformers-5 state dict)."""
    args = args_from_hf_config(hf_model.config)
    chunks = build_model_chunks(args, layout, dtype=dtype)
    ctx = Context(args, expert_layout=expert_layout)
    state = dict(hf_model.state_dict())
    for chunk in chunks:
        engine.load_hf_state_dict(chunk, state, ctx)
    return chunks, ctx


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


def _copies(inputs: MultimodalInputs) -> list[MultimodalInputs]:
    """The interleaved schedule needs at least pp micro-batches: that many copies of one batch (else one)."""
    interleaved = parallel_state.get_virtual_pipeline_model_parallel_world_size() not in (None, 1)
    return [inputs] * (parallel_state.get_pipeline_model_parallel_world_size() if interleaved else 1)


def compare_forward(chunks, hf_model, batch) -> dict[str, float] | None:
    """Logits and LM loss of our model (through megatron's pipeline schedule) vs transformers on one batch.

    Returns the report on the last pipeline stage, None on the others."""
    with torch.no_grad():
        ref = hf_forward(hf_model, batch)
        logits = run_microbatches(chunks, _copies(to_inputs(batch, labels=False)), forward_only=True)
        losses = run_microbatches(chunks, _copies(to_inputs(batch)), forward_only=True, loss_for=loss_for_per_token)
    if not logits:
        return None
    report = logits_report(gather_vocab(logits[0]), ref.logits, batch.get("attention_mask"))
    totals = torch.stack([losses[0]["loss_sum"].double(), torch.as_tensor(losses[0]["tokens"]).double()])
    if parallel_state.get_context_parallel_world_size() > 1:  # each CP rank reports its slice of the row
        dist.all_reduce(totals, group=parallel_state.get_context_parallel_group())
    loss = (totals[0] / totals[1]).item()
    report["loss_diff"] = abs(loss - ref.loss.item())
    report["loss"] = loss
    return report


def reduce_grads_of_identical_batches(chunks) -> None:
    """In place, what megatron's gradient finalization does when every DP rank ran the same batch: sum the
    `sequence_parallel` tensors over TP; dense grads are then replicas across DP (averaged), while an expert on one
    EP rank received the tokens of every DP rank (sum over expert-DP, / DP)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    edp_group = parallel_state.get_expert_data_parallel_group()
    dp = dist.get_world_size(dp_group)
    for model in chunks:
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            if getattr(p, "sequence_parallel", False) and dist.get_world_size(tp_group) > 1:
                dist.all_reduce(p.grad, group=tp_group)
            if dp > 1:
                dist.all_reduce(p.grad, group=edp_group if ".mlp.experts." in name else dp_group)
                p.grad /= dp


def worst_relative(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str | None]:
    """The largest per-tensor relative difference max|g - g_ref| / max(max|g_ref|, 1e-6) over `ours`' names, and
    that tensor's name (a NaN wins, so it is never hidden)."""
    worst, worst_name = 0.0, None
    for name, g in ours.items():
        r = ref[name]
        rel = (g - r).abs().max().item() / max(r.abs().max().item(), 1e-6)
        if rel > worst or math.isnan(rel):
            worst, worst_name = rel, name
    return worst, worst_name


def compare_gradients(chunks, hf_model, batch, ctx: Context, *, aux_coef: float = 0.0) -> dict[str, Any]:
    """One backward of (LM loss + aux_coef * aux loss) in both models; the worst relative gradient difference.

    Ours runs through megatron's schedule (pipeline included). Gradients are reduced over TP for
    sequence-parallel parameters (as megatron's finalize_model_grads does), averaged over data parallelism as
    megatron's DDP does, then gathered to full HF tensors; each stage compares its own parameters.
    Relative difference = max|g - g_ref| / max(max|g_ref|, 1e-6), per tensor. The aux-loss value (transformers'
    formula over all layers of every stage) is compared on every rank.
    """
    for m in (*chunks, hf_model):
        m.train()
        m.zero_grad(set_to_none=True)
    copies = _copies(to_inputs(batch))
    for m in chunks:
        m.aux_loss_coeff = aux_coef
        m.aux_loss_scale = 1.0 / len(copies)  # the LM loss is averaged over the copies: so is the aux loss
    hf_model.config.text_config.router_aux_loss_coef = aux_coef
    # transformers adds coef * load_balancing_loss to its loss when the router logits are output.
    ref = hf_forward(hf_model, batch, aux=aux_coef > 0)
    ref.loss.backward()
    # copies of one batch: each micro-batch's mean loss is divided by their number, so gradients are unchanged
    run_microbatches(chunks, copies, forward_only=False, loss_for=loss_for_per_token)
    reduce_grads_of_identical_batches(chunks)
    ours: dict[str, torch.Tensor] = {}
    for model in chunks:
        # transformers keeps experts in its own (transposed) layout in memory: compare in that layout.
        ours.update(engine.gather_hf_tensors(model, Context(ctx.args, expert_layout=TRANSFORMERS5), source="grad"))
    hf_grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in hf_model.named_parameters()}
    worst, worst_name = worst_relative(ours, hf_grads)
    aux_diff = None
    if aux_coef > 0:
        aux_diff = max(abs(v - ref.aux_loss.item()) for v in chunks[0].routing.aux_losses())
    for m in (*chunks, hf_model):
        m.eval()
    return {"max_rel_grad_diff": worst, "worst_param": worst_name, "compared": sorted(ours), "aux_loss_diff": aux_diff}


def start(layout: ParallelLayout, seed: int = 1234) -> None:
    init_distributed(layout, seed=seed)
