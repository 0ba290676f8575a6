"""The lean optimizer step (training/optimizer_step.py) against megatron's own `optimizer.step()`: the same model,
batches and settings trained twice through `train_step`, once each way, in one process per rank.

`compare_steps` returns numbers for tests to assert on (tests/unit/test_optimizer_step.py at one rank,
tests/multirank/_resume_checks.py inside an existing multi-rank launch): the worst relative difference of the
parameters and of Adam's moments, whether they are bit-identical, both paths' gradient norms and losses, the
fallback reason (None: the lean step ran), and what the lean step did (copies, casts, parameter all-gathers).
"""

from __future__ import annotations

import torch

from qwenvl_mcore.parallel import ParallelLayout
from qwenvl_mcore.testing import parity, tiny

KINDS = ("image", "image")  # the micro-batches of every step (one length: pipeline layouts need it)


def compare_steps(layout_kwargs: dict, *, steps: int = 3, clip_grad: float = 1.0, dtype=torch.float32,
                  grad_dtype: str = "fp32", distributed_optimizer: bool = True, lora: dict | None = None,
                  nan_grad_at: int | None = None, start: bool = True) -> dict:
    """Train `steps` steps both ways at `layout_kwargs` and compare. `nan_grad_at`: that step's gradients of one
    parameter are made NaN (by a tensor hook, before DDP accumulates them), so the step must be skipped."""
    from qwenvl_mcore.training import optimizer_step
    from qwenvl_mcore.training.setup import OptimSettings, build_optimizer, wrap_ddp
    from qwenvl_mcore.training.step import train_step

    layout = ParallelLayout(**layout_kwargs)
    if start:
        parity.start(layout)
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer)
    hf = tiny.build_tiny_hf_model(tiny.tiny_hf_config(tokenizer), seed=0).eval()
    batches = [parity.to_inputs(tiny.sample_inputs(processor, kind)) for kind in KINDS]
    runs = {}
    for name in ("megatron", "lean"):
        chunks, _ = parity.build_pair(hf, layout, dtype=dtype)
        if lora is not None:
            from qwenvl_mcore.lora.config import LoRAConfig
            from qwenvl_mcore.lora.training import prepare

            prepare(chunks, LoRAConfig(**lora))
        for c in chunks:
            c.train()
        base = {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()
                if not p.requires_grad}
        wrapped = wrap_ddp(chunks, distributed_optimizer=distributed_optimizer, grad_dtype=grad_dtype)
        optimizer, scheduler = build_optimizer(
            wrapped, OptimSettings(lr=3e-3, schedule="constant", clip_grad=clip_grad, weight_decay=0.1,
                                   distributed_optimizer=distributed_optimizer), steps=steps)
        if name == "megatron":
            optimizer_step.use_megatron_step(optimizer)
        results, snapshots = [], []
        for i in range(steps):
            hook = None
            if i == nan_grad_at:
                victim = next(p for c in chunks for p in c.parameters() if p.requires_grad)
                hook = victim.register_hook(lambda g: g * float("nan"))
            before = _state(chunks, optimizer) if i == nan_grad_at else None
            result = train_step(wrapped, optimizer, batches)
            if hook is not None:
                hook.remove()
                snapshots.append(_equal(before, _state(chunks, optimizer)))
            if not result.skipped:
                scheduler.step(1)
            results.append(result)
        lean = optimizer_step.lean_step_for(optimizer)
        runs[name] = {
            "results": results, "state": _state(chunks, optimizer), "skip_left_state": snapshots,
            "fallback": optimizer_step.fallback_reason(optimizer),
            "base_changed": sorted(k for k, t in base.items()
                                   if not torch.equal(t, dict(_named(chunks))[k])),
            "parts": None if lean is None else [
                {"copies": len(p.copy_to), "cast": p.cast, "mains": len(p.mains), "stub": p.inner is None}
                for p in lean.parts],
            "gathers": None if lean is None else len(lean.gather_from),
            "needs_zero_grad": None if lean is None else lean.needs_zero_grad,
        }
    ours, ref = runs["lean"], runs["megatron"]
    worst, worst_name = parity.worst_relative(ours["state"], ref["state"])
    return {
        "worst_rel": worst, "worst_name": worst_name,
        "bitwise": ours["state"].keys() == ref["state"].keys()
        and all(torch.equal(ours["state"][k], ref["state"][k]) for k in ref["state"]),
        "n_tensors": len(ref["state"]),
        "n_moments": sum("exp_avg" in k for k in ref["state"]),
        "norms": [r.grad_norm for r in ours["results"]], "ref_norms": [r.grad_norm for r in ref["results"]],
        "losses": [r.loss for r in ours["results"]], "ref_losses": [r.loss for r in ref["results"]],
        "skipped": [r.skipped for r in ours["results"]], "ref_skipped": [r.skipped for r in ref["results"]],
        "skip_left_state": ours["skip_left_state"], "ref_skip_left_state": ref["skip_left_state"],
        "fallback": ours["fallback"], "ref_fallback": ref["fallback"], "parts": ours["parts"],
        "gathers": ours["gathers"], "needs_zero_grad": ours["needs_zero_grad"],
        "base_changed": ours["base_changed"], "n_trainable": sum(1 for _ in _trainable(ours)),
    }


def _named(chunks):
    return [(f"{i}.{n}", p.detach()) for i, c in enumerate(chunks) for n, p in c.named_parameters()]


def _trainable(run):
    return [k for k in run["state"] if k.startswith("param.")]


def _state(chunks, optimizer) -> dict[str, torch.Tensor]:
    """This rank's trainable parameters and the Adam moments and step of every main parameter, cloned."""
    out = {f"param.{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()
           if p.requires_grad}
    for k, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = opt.optimizer
        if inner is None:
            continue
        for g, group in enumerate(inner.param_groups):
            for j, p in enumerate(group["params"]):
                out[f"main.{k}.{g}.{j}"] = p.detach().clone()
                for key, value in inner.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        out[f"{key}.{k}.{g}.{j}"] = value.detach().clone().reshape(-1).float()
    return out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


__all__ = ["compare_steps"]
