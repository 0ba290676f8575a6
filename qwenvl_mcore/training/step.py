"""One optimizer step over a global batch: megatron DDP + distributed optimizer, per-token loss normalisation.

The loss of a step is the mean over every loss token of the global batch (all micro-batches, all data-parallel
ranks), not a mean of per-micro-batch means: each micro-batch returns its loss *sum* and token count, megatron's
`finalize_model_grads` divides the summed gradients by the global token count (`calculate_per_token_loss`).
The MoE load-balancing loss is transformers' per-batch formula averaged over the micro-batches of all DP ranks,
added once: its gradient is pre-multiplied by global tokens / (micro-batches x DP) to survive that division.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX, MultimodalInputs
from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


@dataclass
class StepResult:
    loss: float  # global token-mean LM loss of the step (same value on every rank)
    tokens: int  # loss tokens in the global batch
    aux_loss: float | None  # mean load-balancing loss over micro-batches and DP ranks (None when off)
    grad_norm: float | None
    skipped: bool  # the optimizer skipped the update (non-finite gradients)


def global_token_count(microbatches: Sequence[MultimodalInputs]) -> int:
    """Loss tokens of this rank's micro-batches summed over data parallelism."""
    n = torch.tensor(sum(int((mb.labels != IGNORE_INDEX).sum()) for mb in microbatches), dtype=torch.float64)
    dist.all_reduce(n, group=parallel_state.get_data_parallel_group())
    return int(n.item())


def train_step(chunks: list, optimizer, microbatches: Sequence[MultimodalInputs]) -> StepResult:
    """Forward + backward over this rank's micro-batches, then one optimizer step (collective)."""
    dp = parallel_state.get_data_parallel_world_size()
    tokens = global_token_count(microbatches)
    for c in chunks:
        c.zero_grad_buffer()
        unwrap(c).aux_loss_scale = tokens / (len(microbatches) * dp)
    optimizer.zero_grad()
    reports = run_microbatches(chunks, microbatches, forward_only=False, loss_for=loss_for_per_token)
    updated, grad_norm, _ = optimizer.step()
    loss = _reduce_loss(reports)
    aux = _mean_aux(chunks, len(microbatches))
    return StepResult(loss=loss / max(tokens, 1), tokens=tokens, aux_loss=aux,
                      grad_norm=None if grad_norm is None else float(grad_norm), skipped=not updated)


def _reduce_loss(reports: list) -> float:
    """Sum of loss sums over micro-batches and DP (computed on the last stage, broadcast to the whole pipeline)."""
    total = torch.tensor(sum(float(r["loss_sum"]) for r in reports), dtype=torch.float64)
    if reports:  # last stage
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(total, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return float(total.item())


def _mean_aux(chunks: list, n_micro: int) -> float | None:
    """Load-balancing loss of the last micro-batch per stage chunk, summed over stages, averaged over DP; for
    logging (exact transformers value at pp=1)."""
    values = [unwrap(c).last_aux_loss for c in chunks]
    if any(v is None for v in values):
        return None
    aux = torch.stack([v.float() for v in values]).sum().reshape(1).double()
    if unwrap(chunks[0]).config.sequence_parallel:
        dist.all_reduce(aux, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(aux, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(aux, group=parallel_state.get_data_parallel_group())
    return float(aux.item()) / parallel_state.get_data_parallel_world_size()
