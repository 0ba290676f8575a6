"""The lean optimizer step (training/optimizer_step.py) gives megatron's `optimizer.step()` bit for bit, at one rank.

One single-rank launch trains the tiny model 3 steps each way (qwenvl_mcore/testing/optimizer_steps.py) for:
fp32 with the distributed optimizer, clipping on every step and never; bf16 parameters with fp32 and with bf16
gradient buffers (optim.grad_dtype); the non-distributed fp32 optimizer; a frozen base with LoRA adapters; and a
step whose gradients are NaN (skipped, nothing changed). The multi-rank layouts (EP2 with a ChainedOptimizer, DP2
with the distributed optimizer's parameter all-gather, PP2, TP2xEP2) run inside tests/multirank/test_trainer.py's
resave launch (_resume_checks.py).
"""

from __future__ import annotations

import functools

import pytest

from qwenvl_mcore.testing.dist import run_on_ranks

CASES = {
    "fp32_clip": dict(clip_grad=0.05),  # the tiny model's norms are 1.5-3: every step clips
    "fp32_noclip": dict(clip_grad=1e9),
    "bf16_params": dict(dtype="bf16"),
    "bf16_grads": dict(dtype="bf16", grad_dtype="bf16"),
    "fp32_optimizer": dict(distributed_optimizer=False),
    "lora": dict(lora=dict(method="lora", rank=4, alpha=8.0, targets=["all", "router"])),
    "nan_grads": dict(nan_grad_at=1, steps=4),
}


def _all_cases(rank, world):
    import torch

    from qwenvl_mcore.testing.optimizer_steps import compare_steps

    out = {}
    for name, kwargs in CASES.items():
        kwargs = dict(kwargs)
        if kwargs.get("dtype") == "bf16":
            kwargs["dtype"] = torch.bfloat16
        out[name] = compare_steps({}, **kwargs)
    out["fallback"] = _fallback_reasons()
    return out


def _fallback_reasons() -> dict:
    """What falls back to megatron's step: a feature the lean step leaves to megatron, and a foreign optimizer."""
    from qwenvl_mcore.parallel import ParallelLayout
    from qwenvl_mcore.testing import parity, tiny
    from qwenvl_mcore.training import optimizer_step
    from qwenvl_mcore.training.setup import OptimSettings, build_optimizer, wrap_ddp

    tokenizer = tiny.build_tokenizer()
    hf = tiny.build_tiny_hf_model(tiny.tiny_hf_config(tokenizer), seed=0)
    chunks, _ = parity.build_pair(hf, ParallelLayout())
    optimizer, _ = build_optimizer(wrap_ddp(chunks, distributed_optimizer=True), OptimSettings(), steps=1)
    out = {"default": optimizer_step.fallback_reason(optimizer)}
    optimizer.chained_optimizers[0].config.log_num_zeros_in_grad = True
    setattr(optimizer, "_qwenvl_lean_step", None)  # build again
    out["zeros"] = optimizer_step.fallback_reason(optimizer)
    optimizer.chained_optimizers[0].config.log_num_zeros_in_grad = False
    optimizer.chained_optimizers[0].optimizer = _Foreign(optimizer.chained_optimizers[0].optimizer)
    setattr(optimizer, "_qwenvl_lean_step", None)
    out["foreign"] = optimizer_step.fallback_reason(optimizer)
    return out


class _Foreign:
    """Stands in for an optimizer that is not torch's Adam (Apex/TE FusedAdam, the CPU-offload hybrid)."""

    def __init__(self, inner):
        self.param_groups = inner.param_groups
        self.state = inner.state


@functools.cache
def launch() -> dict:
    return run_on_ranks(_all_cases, 1)[0]


@pytest.mark.parametrize("name", [n for n in CASES if n != "nan_grads"])
def test_lean_step_is_megatrons_bit_for_bit(name):
    r = launch()[name]
    assert r["fallback"] is None and r["ref_fallback"] is not None  # each way ran as asked
    assert r["bitwise"], (r["worst_rel"], r["worst_name"])
    assert r["n_moments"] > 0 and r["n_tensors"] > r["n_moments"]
    assert r["norms"] == r["ref_norms"] and all(n is not None and n > 0 for n in r["norms"])
    assert r["losses"] == r["ref_losses"] and r["losses"][-1] < r["losses"][0]
    assert not any(r["skipped"] + r["ref_skipped"])
    # train_step clears the attached gradients only where autograd could add into them: the non-distributed
    # optimizer steps the model's own parameters; the distributed one's detached shards (the steps above agree
    # with megatron's, which clears them every step, bit for bit)
    assert r["needs_zero_grad"] == (name == "fp32_optimizer")


def test_what_the_lean_step_does_per_dtype():
    got = launch()
    # fp32 parameters: the main shards are views of them, nothing is copied back; both sub-optimizers (dense and
    # expert) of the ChainedOptimizer run it; one rank: no parameter all-gather
    for name in ("fp32_clip", "fp32_noclip", "fp32_optimizer", "lora"):
        parts = got[name]["parts"]
        assert len(parts) == 2 and all(p["copies"] == 0 and not p["cast"] for p in parts), name
        assert got[name]["gathers"] == 0, name
    # bf16 parameters: every main weight goes back into its parameter; bf16 gradient buffers are cast for Adam
    for name, cast in (("bf16_params", False), ("bf16_grads", True)):
        parts = got[name]["parts"]
        assert all(p["copies"] == p["mains"] > 0 and p["cast"] == cast for p in parts), (name, parts)
    assert got["fp32_clip"]["norms"][0] > 20 * 0.05  # the clipping case clips


def test_frozen_base_trains_only_the_adapters():
    r = launch()["lora"]
    assert r["base_changed"] == [] and r["n_trainable"] > 0
    assert r["bitwise"] and r["losses"][-1] < r["losses"][0]


def test_nan_gradients_skip_the_step_and_change_nothing():
    r = launch()["nan_grads"]
    assert r["skipped"] == r["ref_skipped"] == [False, True, False, False]
    assert r["norms"][1] is None and r["ref_norms"][1] is None
    assert r["skip_left_state"] == r["ref_skip_left_state"] == [True]  # parameters and Adam state untouched
    assert r["bitwise"] and r["norms"] == r["ref_norms"]


def test_falls_back_to_megatron_for_what_it_does_not_cover():
    reasons = launch()["fallback"]
    assert reasons["default"] is None
    assert "log_num_zeros_in_grad" in reasons["zeros"]
    assert "not torch's Adam" in reasons["foreign"]


def test_grad_dtype_is_checked():
    from qwenvl_mcore.training.config import ConfigError, compose
    from qwenvl_mcore.training.setup import wrap_ddp

    with pytest.raises(ConfigError, match="optim.grad_dtype='fp16': choose one of fp32, bf16"):
        compose(["optim.grad_dtype=fp16"])
    with pytest.raises(ConfigError, match="set model.dtype=bf16, or optim.grad_dtype=fp32"):
        compose(["optim.grad_dtype=bf16"])
    assert compose(["optim.grad_dtype=bf16", "model.dtype=bf16"]).optim.grad_dtype == "bf16"
    assert compose([]).optim.grad_dtype == "fp32"
    with pytest.raises(ValueError, match="choose one of fp32, bf16"):
        wrap_ddp([], distributed_optimizer=True, grad_dtype="float32")
