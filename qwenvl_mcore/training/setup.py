"""Model chunks wrapped in megatron's DDP, the distributed optimizer and the LR schedule: parallelism and
optimisation applied in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import (
    OptimizerConfig,
    ParamKey,
    ParamWithNamePredicate,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
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
    # dtype of DDP's gradient buffers (accumulation over micro-batches and the data-parallel reduction): fp32, or
    # bf16 = the parameters' dtype (megatron's grad_reduce_in_fp32=False; with bf16 parameters: half the bytes, the
    # optimizer still casts to fp32 for its fp32 main weights)
    grad_dtype: str = "fp32"


GRAD_DTYPES = ("fp32", "bf16")


def wrap_ddp(chunks: list, *, distributed_optimizer: bool, grad_dtype: str = "fp32") -> list:
    """megatron DDP around each chunk (only the first chunk gets buckets overlapped). `grad_dtype` (optim.grad_dtype):
    fp32 gradient buffers, or bf16 ones in the parameters' dtype (megatron's grad_reduce_in_fp32=False)."""
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"optim.grad_dtype={grad_dtype!r}: choose one of {', '.join(GRAD_DTYPES)}.")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_dtype == "fp32", overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer, check_for_nan_in_grad=False)
    # Per-token loss: gradients are summed over data-parallel ranks (DDP reads this flag when it is built, to not
    # scale them by 1/DP) and finalize_model_grads divides them by the global number of loss tokens.
    for c in chunks:
        c.config.calculate_per_token_loss = True
    config = chunks[0].config
    wrapped = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
               for i, c in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(chunks: list, settings: OptimSettings, *, steps: int,
                    lr_overrides: list[tuple[Callable[[str], bool], float]] = ()):
    """The (distributed) Adam optimizer over DDP-wrapped chunks (fp32 master weights) and its LR schedule.

    `lr_overrides`: (name predicate, peak LR) pairs; matching parameters get that peak LR (their minimum scaled by
    the same ratio), warmed up and decayed with the main schedule. Frozen parameters (requires_grad=False) are left
    out by megatron.
    """
    config = chunks[0].config
    offload = {}
    if settings.cpu_offload and torch.cuda.is_available():
        # All optimizer states and the fp32 main weights on the host, updated there by torch's CPU Adam
        # (megatron's HybridDeviceOptimizer, which takes the precision-aware path).
        offload = dict(optimizer_cpu_offload=True, optimizer_offload_fraction=1.0, use_precision_aware_optimizer=True)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, bf16=config.bf16, fp16=False, params_dtype=config.params_dtype,
        use_distributed_optimizer=settings.distributed_optimizer, **offload,
    )
    overrides = get_standard_config_overrides(opt_config)  # no weight decay on biases and norms
    for predicate, lr in lr_overrides:
        key = ParamKey(with_name_predicate=ParamWithNamePredicate(name=f"lr_{lr}", fn=lambda p, n, f=predicate: f(n)))
        overrides[key] = {"max_lr": lr, "min_lr": lr * settings.min_lr / settings.lr if settings.lr else 0.0}
    optimizer = get_megatron_optimizer(opt_config, chunks, config_overrides=overrides)
    use_fused_torch_adam(optimizer)
    decay = settings.decay_steps or steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings.warmup_steps else settings.lr, max_lr=settings.lr,
        min_lr=settings.min_lr if settings.schedule != "constant" else settings.lr,
        lr_warmup_steps=settings.warmup_steps, lr_decay_steps=max(decay, settings.warmup_steps + 1),
        lr_decay_style=settings.schedule, start_wd=settings.weight_decay, end_wd=settings.weight_decay,
        wd_incr_steps=max(decay, 1), wd_incr_style="constant")
    return optimizer, scheduler


def use_fused_torch_adam(optimizer) -> None:
    """Without Apex/transformer-engine megatron builds torch's Adam with its defaults, which on the GPU is the
    `foreach` implementation: it allocates temporaries as large as all the optimizer states of a group at once
    (about 13 GiB for the 30B model at EP8), and it launches kernels per tensor. torch's `fused` Adam updates every
    tensor in place in a few kernels. Set before the first step, so the states (and `step`) are created for it.

    The CPU gets it too (torch's fused Adam runs there; its default there is the single-tensor loop, which reads
    every `step` on the host): tests and CI take the GPU's code path, clipping included."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # Apex / transformer-engine FusedAdam, or the CPU-offload hybrid optimizer
        for group in inner.param_groups:
            params = group["params"]
            if (params and len({p.device.type for p in params}) == 1 and params[0].device.type in ("cuda", "cpu")
                    and not group.get("capturable")):
                group["foreach"], group["fused"] = False, True


@torch.no_grad()
def allocate_optimizer_state(optimizer) -> None:
    """Create Adam's per-parameter state before a checkpoint is loaded into it.

    megatron's DistributedOptimizer builds the sharded state to load into from its own state_dict(), which reads
    the Adam step of every parameter; torch's Adam creates that state on its first step only (the fused Adam of
    Apex/transformer-engine preallocates it, and neither is installed here). One step with zero gradients, zero LR
    and zero weight decay allocates it without changing a weight; the load then overwrites it.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state):
            continue
        saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for param_state in inner.state.values():  # no step taken: a resume from it bias-corrects from step 1
            if torch.is_tensor(param_state.get("step")):
                param_state["step"].zero_()
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd


def load_optimizer_state(optimizer, state: dict) -> None:
    """megatron's optimizer.load_state_dict, then give every parameter its own Adam `step` tensor: without
    Apex/TE megatron restores one shared tensor into all of them, which torch's Adam then increments once per
    parameter in every step (wrong bias correction after a resume)."""
    optimizer.load_state_dict(state)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for param_state in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
