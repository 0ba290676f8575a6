"""Micro-batches through megatron's forward-backward schedules: no pipelining, 1F1B, or interleaved 1F1B,
chosen by megatron from the parallel state. The trainer, the evaluator and the parity checks all go through here.

The ViT runs once per group of `vision_microbatches` micro-batches (the model's setting; 0: all of the call's),
not once per micro-batch: on the rank holding it (first pipeline stage, virtual stage 0) the forward step encodes
the images and videos of a whole group at its first micro-batch and hands each micro-batch its slice of the features
(models/qwen3_vl_moe/vision_batch.py). The ViT backward of a group runs before the first forward after all of its
micro-batches' backward passes, and at the latest just before megatron's `finalize_model_grads` (wrapped for the
call), so the gradients it adds are reduced with the rest. Under context parallelism, and with
vision_microbatches=1, each micro-batch runs the ViT in its own forward (the model's per-micro-batch path).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from qwenvl_mcore.models.qwen3_vl_moe.model import MultimodalInputs
from qwenvl_mcore.models.qwen3_vl_moe.vision_batch import VisionBatches
from qwenvl_mcore.models.qwen3_vl_moe.routing import RoutingStats
from qwenvl_mcore.parallel import context_parallel

# loss_for(batch) -> loss_func(output) -> (loss_sum, num_tokens, report): megatron's per-token-loss contract.
LossFor = Callable[[MultimodalInputs], Callable[[torch.Tensor], tuple]]


def run_microbatches(model_chunks: Sequence[torch.nn.Module], microbatches: Sequence[MultimodalInputs], *,
                     forward_only: bool, loss_for: LossFor | None = None) -> list:
    """Run every micro-batch through the model chunks of this rank (one per virtual pipeline stage).

    Every rank receives the same micro-batches (each stage needs the token ids for MRoPE and masks; only the
    first runs the ViT, grouped as the module docstring says). The routers' statistics of the call are left in each
    chunk's `routing`. Returns, on the last pipeline stage, one entry per micro-batch: the model's output when
    `loss_for` is None (forward only), else the report of each loss_func; an empty list on other stages.
    """
    chunks = list(model_chunks)
    config = chunks[0].config
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    # the model pads to this (under context parallelism: the length of the split row, see context_parallel.py)
    lengths = {context_parallel.split_length(b.input_ids.shape[1], config.context_parallel_size, multiple)
               for b in microbatches}
    if len(lengths) > 1 and config.pipeline_model_parallel_size > 1 and not config.variable_seq_lengths:
        raise ValueError(
            f"micro-batches of different lengths {sorted(lengths)} need variable-length pipeline communication, "
            "which the allgather token dispatcher (CPU) cannot do: pad every micro-batch to one length."
        )
    # A fresh record of the routers' statistics for this call, shared by the chunks of this rank (see routing.py).
    routing = RoutingStats(unwrap(chunks[0]).args.text.num_experts)
    for c in chunks:
        unwrap(c).routing = routing
    numbered = list(enumerate(microbatches))
    if len(chunks) > 1:
        data = [iter(numbered) for _ in chunks]  # each virtual stage walks the micro-batches once
    else:
        data = iter(numbered)

    vision = vision_batches(chunks, microbatches, forward_only=forward_only)

    def forward_step(data_iterator, model):
        index, batch = next(data_iterator)
        kwargs = {}
        if vision is not None:
            vision.backward_ready()  # groups whose micro-batches are all done: their ViT backward, memory freed
            module = unwrap(model)
            if module.pre_process:
                features = vision.features(index, module.vision)
                if features is not None:
                    kwargs["vision_features"] = features
        return model(batch, microbatch_index=index, **kwargs), (None if loss_for is None else loss_for(batch))

    schedule_config = get_model_config(chunks[0])
    finalize = schedule_config.finalize_model_grads_func
    if vision is not None and finalize is not None and not forward_only:
        def finalize_after_vision(*args, **kwargs):
            vision.backward_all()  # the step's last ViT backward, before the gradients are reduced
            return finalize(*args, **kwargs)

        schedule_config.finalize_model_grads_func = finalize_after_vision
    try:
        result = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data,
            model=chunks,
            num_microbatches=len(microbatches),
            seq_length=max(lengths),
            micro_batch_size=microbatches[0].input_ids.shape[0],
            forward_only=forward_only,
        )
    finally:
        schedule_config.finalize_model_grads_func = finalize
    if vision is not None and not forward_only:
        vision.backward_all()  # without megatron's finalize (chunks not wrapped in DDP): after the schedule
    return result


def vision_batches(chunks: Sequence[torch.nn.Module], microbatches: Sequence[MultimodalInputs], *,
                   forward_only: bool) -> VisionBatches | None:
    """The call's batched-ViT bookkeeping on the rank holding the ViT (first chunk on the first pipeline stage),
    None where the ViT runs per micro-batch (vision_microbatches=1, context parallelism) or nowhere."""
    model = unwrap(chunks[0])
    if not model.pre_process or model.vision_microbatches == 1 or model.config.context_parallel_size > 1:
        return None
    a = model.args
    return VisionBatches(microbatches, model.vision_microbatches, image_token_id=a.image_token_id,
                         video_token_id=a.video_token_id, merge_size=a.vision.spatial_merge_size,
                         grad=not forward_only)


def per_token_loss(batch: MultimodalInputs, output: torch.Tensor):
    """loss_func for per-token losses [b, s] (0 where ignored): (sum, number of loss tokens, report)."""
    # this rank's loss tokens: under context parallelism the output holds only this CP rank's slice
    cp = parallel_state.get_context_parallel_world_size()
    rank = parallel_state.get_context_parallel_rank() if cp > 1 else 0
    n = torch.tensor(context_parallel.loss_token_count(batch, cp, rank), device=output.device, dtype=torch.int)
    total = output.sum()
    # clone: megatron's schedule divides the returned loss in place
    return total, n, {"loss_sum": total.detach().clone(), "tokens": n}


def loss_for_per_token(batch: MultimodalInputs):
    return partial(per_token_loss, batch)


def unwrap(module):
    """The model inside DDP (and other `.module`) wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
