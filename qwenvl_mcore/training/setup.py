"""Model chunks wrapped in megatron's DDP, the distributed optimizer and the LR schedule: parallelism and
optimisation applied in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass
class OptimSettings:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: int | None = None  # default: the run's steps
    schedule: str = "cosine"  # cosine | constant | linear
    distributed_optimizer: bool = True
    cpu_offload: bool = False


def wrap_ddp(chunks: list, *, distributed_optimizer: bool) -> list:
    """megatron DDP around each chunk (fp32 gradient reduction; only the first chunk gets buckets overlapped)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False)
    wrapped = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
               for i, c in enumerate(chunks)]
    config = chunks[0].config
    # per-token loss: finalize_model_grads divides the summed gradients by the global number of loss tokens
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(chunks: list, settings: OptimSettings, *, steps: int):
    """The (distributed) Adam optimizer over DDP-wrapped chunks (fp32 master weights) and its LR schedule."""
    config = chunks[0].config
    opt_config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, bf16=config.bf16, fp16=False, params_dtype=config.params_dtype,
        use_distributed_optimizer=settings.distributed_optimizer,
        optimizer_cpu_offload=settings.cpu_offload and torch.cuda.is_available(),
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    decay = settings.decay_steps or steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings.warmup_steps else settings.lr, max_lr=settings.lr,
        min_lr=settings.min_lr if settings.schedule != "constant" else settings.lr,
        lr_warmup_steps=settings.warmup_steps, lr_decay_steps=max(decay, settings.warmup_steps + 1),
        lr_decay_style=settings.schedule, start_wd=settings.weight_decay, end_wd=settings.weight_decay,
        wd_incr_steps=max(decay, 1), wd_incr_style="constant")
    return optimizer, scheduler
