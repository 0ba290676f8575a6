"""One optimizer step over a global batch: megatron DDP + distributed optimizer, per-token loss normalisation.

The loss of a step is the mean over every loss token of the global batch (all micro-batches, all data-parallel
ranks), not a mean of per-micro-batch means: each micro-batch returns its loss *sum* and token count, megatron's
`finalize_model_grads` divides the summed gradients by the global token count (`calculate_per_token_loss`).
The MoE load-balancing loss is transformers' formula per micro-batch (over all layers, see routing.py), averaged
over the micro-batches of all DP ranks and added once: its gradient is pre-multiplied by
global tokens / (micro-batches x DP) to survive that division. With M micro-batches of a fixed global batch on D
ranks, M x D is the same for every layout, so the objective does not depend on the DP size.

Under context parallelism every CP rank of a DP rank runs the same micro-batches, each on its slice of the row:
token counts of the global batch are summed over DP only, the loss sums and the per-rank token counts megatron
divides by over DP x CP, and the routers' statistics (hence the aux loss) already span the CP ranks.

A step whose loss or gradient norm is not finite changes nothing (no update, no LR step) and is reported; so does a
step without any loss token (every sample of the global batch skipped), which runs no forward pass at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX, MultimodalInputs
from qwenvl_mcore.parallel.distributed import all_reduce
from qwenvl_mcore.training import optimizer_step
from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches, unwrap


@dataclass
class StepResult:
    loss: float  # global token-mean LM loss of the step (same value on every rank)
    tokens: int  # loss tokens in the global batch
    aux_loss: float | None  # load-balancing loss: mean over micro-batches and DP ranks (None when not recorded)
    grad_norm: float | None  # before clipping; None when skipped
    skipped: bool  # no update: non-finite loss or gradients
    expert_load: list[float] | None = None  # per layer: max / mean tokens per expert over the global batch
    aux_coeff: float = 0.0
    empty: bool = False  # no loss token in the global batch (every sample skipped): nothing ran or changed

    @property
    def total_loss(self) -> float:
        """The optimised objective: LM loss + coefficient x aux loss."""
        return self.loss + self.aux_coeff * (self.aux_loss or 0.0)


def global_counts(microbatches: Sequence[MultimodalInputs]) -> tuple[int, int]:
    """(loss tokens, micro-batches holding any real token) of this rank's micro-batches, summed over data
    parallelism. All-padding micro-batches (fillers up to the agreed count) are not counted."""
    n = torch.tensor([sum(int((mb.labels != IGNORE_INDEX).sum()) for mb in microbatches),
                      sum(int(mb.attention_mask is None or bool(mb.attention_mask.any())) for mb in microbatches)],
                     dtype=torch.float64)
    all_reduce(n, parallel_state.get_data_parallel_group())
    return int(n[0]), int(n[1])


def train_step(chunks: list, optimizer, microbatches: Sequence[MultimodalInputs]) -> StepResult:
    """Forward + backward over this rank's micro-batches, then one optimizer step (collective)."""
    tokens, filled = global_counts(microbatches)
    if tokens == 0:
        # Nothing to learn from. Running the step anyway would still move the weights (Adam's momentum and weight
        # decay act without gradients); the count is global, so every rank returns here together.
        return StepResult(loss=0.0, tokens=0, aux_loss=None, grad_norm=None, skipped=False, empty=True)
    lean = optimizer_step.lean_step_for(optimizer)  # None: megatron's own step (fallback_reason says why)
    for c in chunks:
        c.zero_grad_buffer()
        # the aux loss enters as the mean over micro-batches; the per-token loss normalisation divides by tokens
        unwrap(c).aux_loss_scale = tokens / max(filled, 1)
    # Also for the lean step when its main parameters are the model's (non-distributed optimizers): autograd would
    # accumulate into the gradients it attached. The distributed optimizer's mains are views or copies, whose
    # gradients the lean step re-attaches every step, and DDP's hooks leave the model's `.grad` unset.
    if lean is None or lean.needs_zero_grad:
        optimizer.zero_grad()
    reports = run_microbatches(chunks, microbatches, forward_only=False, loss_for=loss_for_per_token)
    loss = float(reduce_reports(reports)[0]) / max(tokens, 1)
    model = unwrap(chunks[0])
    aux = _mean_aux(model.routing)
    load = expert_load(chunks)
    # The gradient norm is checked before the update (megatron's step would apply NaN gradients in bf16/fp32).
    if lean is not None:
        norm = optimizer_step.prepare(lean)
    else:
        optimizer.prepare_grads()
        norm = float(optimizer.get_grad_norm())
    if not (math.isfinite(loss) and math.isfinite(norm)):
        return StepResult(loss=loss, tokens=tokens, aux_loss=aux, grad_norm=None, skipped=True, expert_load=load,
                          aux_coeff=model.aux_loss_coeff)
    if lean is not None:
        optimizer_step.step(lean, norm)
        updated, grad_norm = True, norm
    else:
        updated, grad_norm, _ = optimizer.step()
    return StepResult(loss=loss, tokens=tokens, aux_loss=aux, grad_norm=None if grad_norm is None else float(grad_norm),
                      skipped=not updated, expert_load=load, aux_coeff=model.aux_loss_coeff)


def reduce_reports(reports: list, keys: tuple[str, ...] = ("loss_sum",)) -> torch.Tensor:
    """Sums of the loss reports' `keys` over micro-batches and DP, computed on the last pipeline stage and broadcast
    to the whole pipeline (float64, the same on every rank)."""
    total = _summed_on_device(reports, keys)
    if reports:  # last stage; each CP rank reports its slice of the rows
        all_reduce(total, parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(total, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def _summed_on_device(reports: list, keys: tuple[str, ...]) -> torch.Tensor:
    """Per key, the reports' values summed in float64 in micro-batch order, [len(keys)] on the host: the numbers of
    Python's sum of their floats, with one host read for all micro-batches rather than one per micro-batch."""
    if not reports or not all(torch.is_tensor(r[k]) for r in reports for k in keys):
        return torch.tensor([sum(float(r[k]) for r in reports) for k in keys], dtype=torch.float64)

    def as_float64(v: torch.Tensor) -> torch.Tensor:
        return v.detach().reshape(()).to(torch.float64)  # exact, as float() of an fp32 or int value

    sums = []
    for k in keys:
        acc = as_float64(reports[0][k])
        for r in reports[1:]:
            acc = acc + as_float64(r[k])
        sums.append(acc)
    return torch.stack(sums).cpu()


def _mean_aux(routing) -> float | None:
    """Mean of the micro-batches' load-balancing losses over this rank's micro-batches and the DP ranks (each
    micro-batch's value already spans every layer, SP rank, CP rank and pipeline stage). The sums stay on the
    device (routing.RoutingStats.aux_loss_total) up to one host read here; an object that only lists its values
    (`aux_losses`) is summed on the host."""
    if routing is None:  # the same on every rank: a model without routers
        return None
    # A rank whose micro-batches are all padding has no value, but it must join the all-reduce all the same.
    if hasattr(routing, "aux_loss_total"):
        total = routing.aux_loss_total()
    else:
        values = routing.aux_losses()
        total = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    all_reduce(total, parallel_state.get_data_parallel_group())
    value_sum, count = total.tolist()
    return value_sum / count if count > 0 else None


def expert_load(chunks: list) -> list[float] | None:
    """Per LLM layer, max / mean tokens per expert over the global batch of the last schedule call (1.0 is
    perfectly balanced); the same list on every rank."""
    model = unwrap(chunks[0])
    if model.routing is None:
        return None
    # no early return for a rank without micro-batch statistics: its zero counts join the collectives below; the
    # counts stay on the device until the one read of the ratios
    counts = model.routing.layer_counts(model.args.text.num_hidden_layers, device=model.device)
    if model.config.sequence_parallel:
        all_reduce(counts, parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_context_parallel_world_size() > 1:
        all_reduce(counts, parallel_state.get_context_parallel_group())
    all_reduce(counts, parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        all_reduce(counts, parallel_state.get_pipeline_model_parallel_group())
    mean = counts.mean(dim=1).clamp_min(1e-12)
    return (counts.max(dim=1).values / mean).tolist()
