"""The optimizer step of `train_step` without megatron's per-tensor fallbacks: one gradient norm, one host read.

Without Apex or transformer-engine, megatron-core 0.19.2's step (`ChainedOptimizer.step` over
`DistributedOptimizer`s) works tensor by tensor: it sets every main parameter's gradient (`copy_group_grads`: a view
and `.float()` each), computes the gradient norm with a host read per tensor (`utils.local_multi_tensor_l2_norm`
builds `torch.tensor(list of norms)`), clips with a `copy_(src * scale)` per tensor, and after the inner Adam step
copies every main shard back into the parameter buffer (`copy_group_params`), which for fp32 parameters is a copy of
a tensor onto itself: the main shard is a view of the parameter. `train_step` also computed the norm once more
before the step, to skip non-finite ones.

`LeanStep` does the same step with the same numbers:
- the gradients the inner optimizer reads are views of DDP's gradient buffer built once (`main_grad` sliced as
  megatron slices it) and attached every step; bf16/fp16 gradients of fp32 main weights (`optim.grad_dtype=bf16`)
  are cast into one fp32 buffer per step (megatron casts them one by one);
- the norm: `torch._foreach_norm` over the gradients megatron counts (its `_filter_grads_for_norm`: no shared or
  tensor-parallel duplicate parameters), the norm of those norms squared and all-reduced over each sub-optimizer's
  `get_grad_stats_parallel_group()`, combined as `ChainedOptimizer.get_grad_norm` combines them (one group shared
  by all sub-optimizers, or one norm per group); the same ops in the same order, so the same value; one host read;
- clipping: one `torch._foreach_mul_` per sub-optimizer on the steps that clip (megatron's coefficient, the same
  product as its `copy_(src * scale)`: bit-identical). Folding the coefficient into torch's fused Adam as
  `grad_scale` instead (Adam divides by it) saves that pass but is not the same rounding: measured on the tiny
  model, 4.6e-6 relative in the parameters after 3 clipped steps, above the 1e-6 the project allows;
- after the inner step, one `torch._foreach_copy_` of the fp32 main weights into the bf16 parameters (nothing for
  fp32 parameters, which the main shards are views of), then the distributed optimizer's parameter all-gather
  (`start_param_sync_for_bucket_group_subset`, as its `step_with_ready_grads` does) once after every sub-optimizer
  stepped: megatron runs it after each sub-optimizer, over every bucket of the shared model chunks each time (the
  experts' buckets once before their update too); skipped when every data-parallel group has one rank.
The 1/num_tokens scale stays where megatron puts it (`finalize_model_grads`, one in-place multiply per gradient
buffer): every gradient reader sees the gradients it sees today, and the norm is the norm of the scaled gradients
exactly.

What it does not cover falls back to megatron's own step (`lean_step_for` returns None and says why in
`fallback_reason`): the CPU-offload HybridDeviceOptimizer and Apex/TE FusedAdam (not torch's Adam), loss scaling
(fp16), the precision-aware optimizer, fp8/fp4 parameter gathers, overlapped parameter gathers, megatron-FSDP,
separate gradient-norm groups (MTP), a finite `grad_norm_skip_threshold`, zero counting, and any other optimizer
class. The optimizer's state, its checkpoints and the LR schedule are megatron's, untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from qwenvl_mcore.parallel.distributed import all_reduce

_CACHE_ATTR = "_qwenvl_lean_step"


@dataclass
class _Part:
    """One megatron sub-optimizer (the dense or the expert one of a ChainedOptimizer)."""

    opt: object
    inner: torch.optim.Optimizer | None  # None: a stub (no trainable parameter of this kind on this rank)
    group: object  # its grad-stats process group
    signature: tuple = ()  # (id, length) of each inner param group's list: rebuilt when the inner groups change
    mains: list[torch.Tensor] = field(default_factory=list)  # the inner optimizer's parameters, in its order
    grads: list[torch.Tensor] = field(default_factory=list)  # per main: its gradient (a view of DDP's buffer)
    cast: bool = False  # gradients in bf16/fp16 for fp32 main weights: cast into one fp32 buffer per step
    norm_index: list[int] = field(default_factory=list)  # mains whose gradients count in the norm
    copy_from: list[torch.Tensor] = field(default_factory=list)  # fp32 main weights ...
    copy_to: list[torch.Tensor] = field(default_factory=list)  # ... into the bf16 parameters (their buffer)
    clip: float = 0.0


class LeanStep:
    """The optimizer step for one megatron optimizer (see the module docstring). Build with `lean_step_for`."""

    def __init__(self, optimizer, parts: list[_Part], gather_from: list):
        self.optimizer = optimizer
        self.parts = parts
        self.gather_from = gather_from  # distributed optimizers whose model chunks' parameters to all-gather
        self.chained = hasattr(optimizer, "chained_optimizers")
        # ChainedOptimizer.get_grad_norm: one norm over all sub-optimizers when they share the grad-stats group
        self.shared = len(parts) == 1 or (self.chained and optimizer.grads_states_parallel_group_is_shared())
        self._current: list[list[torch.Tensor]] = []  # this step's gradients per part (after any cast)
        # Whether a main parameter is one autograd accumulates into, a leaf that requires grad (megatron's
        # fp32/float16 optimizers step the model's own parameters): then the attached gradients must be cleared
        # before the next backward, or autograd would add into DDP's buffer through them. The distributed
        # optimizer's mains are views of the parameters (fp32) or detached fp32 copies, never such leaves.
        self.needs_zero_grad = any(m.is_leaf and m.requires_grad for p in parts for m in p.mains)

    def _stale(self) -> bool:
        return any(p.inner is not None and _signature(p.inner) != p.signature for p in self.parts)

    @torch.no_grad()
    def attach_grads(self) -> None:
        """Give every main parameter its gradient for this step (after finalize_model_grads)."""
        self._current = []
        for p in self.parts:
            grads = p.grads
            if p.cast and grads:
                flat = torch.empty(sum(g.numel() for g in grads), dtype=p.mains[0].dtype, device=grads[0].device)
                grads = list(torch.split(flat, [g.numel() for g in grads]))
                grads = [g if g.shape == m.shape else g.view(m.shape) for g, m in zip(grads, p.mains)]
                torch._foreach_copy_(grads, p.grads)
            for m, g in zip(p.mains, grads):
                m.grad = g
            self._current.append(grads)

    @torch.no_grad()
    def grad_norm(self) -> float:
        """The gradient norm megatron's `optimizer.get_grad_norm()` returns, with one host read (collective)."""
        sums = []
        if self.shared:
            grads = [g for p, grads in zip(self.parts, self._current) for g in (grads[i] for i in p.norm_index)]
            sums.append(_reduced_square(grads, self.parts[0].group, self._device()))
            return float(sums[0].item()) ** 0.5
        for p, grads in zip(self.parts, self._current):
            sums.append(_reduced_square([grads[i] for i in p.norm_index], p.group, self._device()))
        # per sub-optimizer norm, then the root of their squares, as ChainedOptimizer.get_grad_norm in Python floats
        norms = [v ** 0.5 for v in torch.cat(sums).tolist()]
        return math.sqrt(sum(x ** 2 for x in (n if n else 0.0 for n in norms)))

    @torch.no_grad()
    def step(self, grad_norm: float) -> None:
        """Clip by `grad_norm` (as megatron: coefficient clip / (norm + 1e-6) when below 1), step every inner
        optimizer, write the main weights back into the parameters and all-gather them."""
        for p, grads in zip(self.parts, self._current):
            if p.inner is None:
                continue
            coeff = p.clip / (grad_norm + 1.0e-6) if p.clip > 0.0 else 1.0
            if coeff < 1.0 and grads:
                torch._foreach_mul_(grads, coeff)
            p.inner.step()  # also with no main parameter here (an empty shard): as megatron, which always calls it
            if p.copy_from:
                torch._foreach_copy_(p.copy_to, p.copy_from)
            if p.cast:  # the fp32 copies are this step's only: free them now rather than at the next step
                for m in p.mains:
                    m.grad = None
        for opt in self.gather_from:  # collective over each data-parallel group: on every rank, shard or not
            opt.start_param_sync_for_bucket_group_subset()
        self._current = []

    def _device(self) -> torch.device:
        for p in self.parts:
            if p.grads:
                return p.grads[0].device
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prepare(lean: LeanStep) -> float:
    """Attach this step's gradients and return their norm (collective; one host read). What train_step calls
    between the backward passes and the non-finite check (a module function, so a profiler can wrap it)."""
    lean.attach_grads()
    return lean.grad_norm()


def step(lean: LeanStep, grad_norm: float) -> None:
    """Clip, step and gather (LeanStep.step); train_step calls it when the norm is finite."""
    lean.step(grad_norm)


def _signature(inner) -> tuple:
    return tuple((id(g["params"]), len(g["params"])) for g in inner.param_groups)


def _reduced_square(grads: list[torch.Tensor], group, device) -> torch.Tensor:
    """megatron's get_grad_norm_fp32 up to its final root: the norm of the per-tensor norms, squared, all-reduced
    (shape [1], float32), without its host read per tensor."""
    if grads:
        local = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).reshape(1) ** 2.0
    else:
        local = torch.zeros(1, dtype=torch.float, device=device)
    all_reduce(local, group)
    return local


def fallback_reason(optimizer) -> str | None:
    """Why `train_step` uses megatron's own step for `optimizer` (None: it uses LeanStep)."""
    cached = getattr(optimizer, _CACHE_ATTR, None)
    if cached is None:
        lean_step_for(optimizer)
        cached = getattr(optimizer, _CACHE_ATTR)
    return cached if isinstance(cached, str) else None


def use_megatron_step(optimizer, reason: str = "asked for megatron's step") -> None:
    """Make `train_step` use megatron's own `optimizer.step()` for this optimizer (the reference path)."""
    setattr(optimizer, _CACHE_ATTR, reason)


def lean_step_for(optimizer) -> LeanStep | None:
    """The LeanStep of `optimizer`, built on first use and rebuilt when its inner parameter groups change (a
    checkpoint load may replace them); None when megatron's own step must run (see fallback_reason)."""
    cached = getattr(optimizer, _CACHE_ATTR, None)
    if isinstance(cached, str):
        return None
    if isinstance(cached, LeanStep) and not cached._stale():
        return cached
    built = _build(optimizer)
    setattr(optimizer, _CACHE_ATTR, built)
    return built if isinstance(built, LeanStep) else None


def _build(optimizer) -> LeanStep | str:
    """A LeanStep, or the reason why megatron's step must run instead."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import (
        GRAD_NORM_GROUP_ATTR,
        ChainedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    )

    subs = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    if not subs:
        return "no sub-optimizer"
    parts = []
    for opt in subs:
        kind = type(opt)
        if kind not in (DistributedOptimizer, FP32Optimizer, Float16OptimizerWithFloat16Params):
            return f"{kind.__name__}: not one of megatron's distributed, fp32 or float16 optimizers"
        config = opt.config
        if getattr(opt, "grad_scaler", None) is not None:
            return "loss scaling (fp16): megatron unscales and checks for inf in its own step"
        if config.use_precision_aware_optimizer:
            return "precision-aware optimizer (transformer-engine FusedAdam with decoupled gradients)"
        if math.isfinite(config.grad_norm_skip_threshold) or config.log_num_zeros_in_grad:
            return "grad_norm_skip_threshold / log_num_zeros_in_grad are megatron step features"
        if config.reuse_grad_buf_for_mxfp8_param_ag or config.overlap_param_gather_with_optimizer_step:
            return "mxfp8 buffer reuse / parameter gather overlapped with the step"
        ddp = getattr(opt, "ddp_config", None)
        if ddp is not None and (ddp.use_megatron_fsdp or ddp.overlap_param_gather or ddp.fp8_param_gather
                                or getattr(ddp, "fp4_param_gather", False)):
            return "megatron-FSDP, overlapped or fp8/fp4 parameter gather"
        if opt.is_stub_optimizer or opt.optimizer is None:
            parts.append(_Part(opt, None, opt.get_grad_stats_parallel_group()))
            continue
        inner = opt.optimizer
        # HybridDeviceOptimizer (CPU offload) and Apex/TE FusedAdam keep their own gradients and master weights
        if not isinstance(inner, torch.optim.Adam):
            return f"inner optimizer {type(inner).__name__} is not torch's Adam/AdamW"
        pairs = _grad_sources(opt, kind is DistributedOptimizer, kind is Float16OptimizerWithFloat16Params)
        if isinstance(pairs, str):
            return pairs
        part = _Part(opt, inner, opt.get_grad_stats_parallel_group(), signature=_signature(inner),
                     clip=float(config.clip_grad))
        for group in inner.param_groups:
            for main in group["params"]:
                if id(main) not in pairs:
                    return "an inner parameter without a gradient in DDP's buffer"
                grad, target = pairs[id(main)]
                if getattr(main, GRAD_NORM_GROUP_ATTR, None) is not None:
                    return "a separate gradient-norm group (megatron clips it by its own norm)"
                if grad.dtype != main.dtype:
                    if main.dtype != torch.float32:
                        return f"{grad.dtype} gradients for {main.dtype} main weights"
                    part.cast = True
                if _counts_in_norm(opt, main):
                    part.norm_index.append(len(part.mains))
                part.mains.append(main)
                part.grads.append(grad)
                if target is not None and not _same_memory(target, main):
                    part.copy_from.append(main)
                    part.copy_to.append(target)
        parts.append(part)
    return LeanStep(optimizer, parts, _gather_from([p.opt for p in parts if p.inner is not None], DistributedOptimizer))


def _gather_from(opts: list, distributed) -> list:
    """The distributed optimizers whose `start_param_sync_for_bucket_group_subset` covers every bucket of every
    model chunk once (each walks all buckets of its model chunks), or [] when no data-parallel group has 2 ranks."""
    dist_opts = [o for o in opts if isinstance(o, distributed)]
    if not any(dist.get_world_size(o.data_parallel_group) > 1 for o in dist_opts):
        return []
    chosen, covered = [], set()
    for o in dist_opts:
        chunks = {id(c) for c in o.model_chunks}
        if not chunks <= covered:
            chosen.append(o)
            covered |= chunks
    return chosen


def _grad_sources(opt, distributed: bool, float16: bool) -> dict | str:
    """id(main parameter) -> (its gradient as megatron hands it to the inner optimizer, before any cast; where the
    main weight goes after the step, or None when it is the parameter itself)."""
    out = {}
    if distributed:
        for model_groups, main_groups in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                                          (opt.model_fp32_groups, opt.shard_fp32_groups)):
            for model_group, main_group in zip(model_groups, main_groups):
                for model_param, main in zip(model_group, main_group):
                    ranges = opt._get_model_param_range_map(model_param)
                    param_range, world_range = ranges["param"], ranges["gbuf_world_in_bucket"]
                    grad = model_param.main_grad.view(-1)[param_range.start:param_range.end]
                    gbuf_index, _, bucket_id = opt.model_param_gbuf_map[model_param]
                    buffer = opt.buffers[gbuf_index].buckets[bucket_id].param_data
                    target = buffer.view(-1)[world_range.start:world_range.end]
                    out[id(main)] = (grad, target)
        return out
    if float16:
        for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            for model_param, main in zip(model_group, main_group):
                if getattr(model_param, "main_grad", None) is None:
                    return "a float16 parameter without main_grad"
                out[id(main)] = (model_param.main_grad, model_param.data)
        groups = opt.fp32_from_fp32_groups
    else:
        groups = [g["params"] for g in opt.optimizer.param_groups]
    for group in groups:
        for param in group:
            if getattr(param, "main_grad", None) is None:
                return "a parameter without main_grad (not wrapped in megatron DDP)"
            out[id(param)] = (param.main_grad, None)
    return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.numel() == b.numel() and a.data_ptr() == b.data_ptr()
            and a.device == b.device)


def _counts_in_norm(opt, param) -> bool:
    """megatron's MegatronOptimizer._filter_grads_for_norm for one parameter with a gradient."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import param_is_not_shared

    return (param_is_not_shared(param)
            and tensor_parallel.param_is_not_tensor_parallel_duplicate(
                param, tp_group=getattr(opt, "tp_group", None), expert_tp_group=getattr(opt, "expert_tp_group", None))
            and tensor_parallel.param_is_not_gtp_duplicate(param))


__all__ = ["LeanStep", "lean_step_for", "fallback_reason", "use_megatron_step", "prepare", "step"]
