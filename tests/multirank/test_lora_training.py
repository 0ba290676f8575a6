"""LoRA through the trainer (`peft=lora`, issue 18) on the tiny model at TP2xEP2 with sequence parallelism, one
launch (tests/multirank/_lora_training_checks.py):

- 20 steps: the base is bit-identical to a fresh load of model.init_from, stays fp32, has no gradient buffer and no
  optimizer state (only adapters are in megatron's DDP buffers, from which the distributed optimizer takes its
  parameters); every B moved off zero; the loss falls;
- the run's checkpoint of step 12 copied into a fresh run, stopped after step 13 by the stop file (as slurm/node.sh
  stops a pre-empted job) and resumed gives the straight run's steps 13-20 bit for bit;
- resumed at DP4 (no TP, EP, SP) instead, it stays within 1e-5 of the loss and 1e-4 of the grad norm (relative);
- layout invariance from step 0: the first 10 steps at TP2xEP2+SP and at PP2 (x DP2) equal one rank's (loss 1e-5,
  grad norm 1e-4 relative; a second launch, of one rank);
- a LoRA checkpoint holds only adapters (model and optimizer state) and names its base with a hash;
- resuming on another base, with full training, or with another rank is refused before any step, naming both.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import pytest

from qwenvl_mcore.checkpoint import dcp
from qwenvl_mcore.lora import training as lora_training
from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.dist import run_on_ranks

from _lora_training_checks import INVARIANCE_STEPS, RESUME_AT, STEPS, lora_training_checks, single_rank_run

WORK = Path(tempfile.mkdtemp(prefix="qwenvl-lora-training-"))


@functools.cache
def bases() -> tuple[Path, Path]:
    """Two converted tiny checkpoints from the same HF directory path (same config, weight index and source), with
    other weights (seeds 1 and 0): only the hash's sampled values tell them apart."""
    from qwenvl_mcore.conversion.convert import hf_to_mcore

    hf = WORK / "hf"
    tiny.save_tiny_hf_checkpoint(hf, seed=1)
    hf_to_mcore(str(hf), str(WORK / "other_base"), progress=False)
    tiny.save_tiny_hf_checkpoint(hf, seed=0)
    hf_to_mcore(str(hf), str(WORK / "base"), progress=False)
    return WORK / "base", WORK / "other_base"


@functools.cache
def launch() -> dict:
    base, other = bases()
    results = run_on_ranks(lora_training_checks, 4, str(WORK / "runs"), str(base), str(other))
    return results


@functools.cache
def single() -> dict:
    return run_on_ranks(single_rank_run, 1, str(WORK / "one_rank"), str(bases()[0]))[0]


def _close(ours: list[dict], want: list[dict]) -> list:
    """Steps whose loss (1e-5), aux loss (1e-6), grad norm (1e-4 relative) or lr differ from `want`'s."""
    return [(o, w) for o, w in zip(ours, want)
            if o["step"] != w["step"] or abs(o["loss"] - w["loss"]) > 1e-5 or o["lr"] != w["lr"]
            or abs(o["aux_loss"] - w["aux_loss"]) > 1e-6 or abs(o["grad_norm"] - w["grad_norm"]) > 1e-4 * w["grad_norm"]]


@pytest.mark.parametrize("layout", ["straight", "pp2"])
def test_lora_training_does_not_depend_on_the_layout(layout):
    """10 LoRA steps from the start at TP2xEP2 with SP (the straight run's first 10) and at PP2 x DP2 equal one
    rank's; the runs differ (the adapters train), so equal numbers are not vacuous."""
    one = single()
    assert one["status"] == "completed" and len(one["records"]) == INVARIANCE_STEPS
    r = launch()[0]
    if layout == "pp2":
        assert r["pp2_status"] == "completed"
    ours = r[layout][:INVARIANCE_STEPS]
    assert len(ours) == INVARIANCE_STEPS
    assert _close(ours, one["records"]) == []
    assert one["records"][-1]["loss"] < one["records"][0]["loss"] - 0.1, one["records"]


def test_bf16_lora_keeps_a_bf16_base_and_fp32_masters_of_the_adapters_only():
    """model.dtype=bf16 (one rank, 6 steps, the base converted from fp32): the base stays bf16, bit-identical to a
    fresh bf16 load, with no gradient buffer; the optimizer steps fp32 masters of exactly the adapters' elements;
    every B moved; the loss falls."""
    r = single()["bf16"]
    assert r["status"] == "completed"
    assert r["base_dtypes"] == ["torch.bfloat16"] and r["adapter_dtypes"] == ["torch.bfloat16"]
    assert r["n_base"] > 40 and r["base_changed"] == [] and r["base_trainable"] == [], r["base_changed"][:5]
    assert r["buffered"] and all(r["buffered"])
    assert r["master_dtypes"] == ["torch.float32"] and r["master_numel"] == r["adapter_numel"] > 0
    assert r["b_zero"] == []
    losses = [m["loss"] for m in r["records"]]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses


def test_base_hash_tells_same_shaped_bases_apart():
    base, other = bases()
    a, b = lora_training.base_reference(str(base)), lora_training.base_reference(str(other))
    assert a["hash"] != b["hash"] and len(a["hash"]) == 64
    assert lora_training.base_hash(str(base)) == a["hash"]  # deterministic


def test_twenty_steps_train_only_adapters_on_a_bit_identical_base():
    for rank, r in enumerate(launch()):
        assert r["straight_status"] == "completed"
        assert r["n_base"] > 40, r["n_base"]
        assert r["base_changed"] == [], (rank, r["base_changed"][:5])
        assert r["base_dtypes"] == ["torch.float32"]
        assert r["base_trainable"] == [], (rank, r["base_trainable"][:5])
        assert r["buffered"] and all(r["buffered"]), rank  # only adapters in the gradient buffers
        assert r["b_zero"] == [], (rank, r["b_zero"][:5])
    losses = [m["loss"] for m in launch()[0]["straight"]]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses  # 6.69 -> 5.75 at the time of writing


def test_stop_and_resume_is_bit_identical():
    """Resumed from step 12, stopped by the stop file after step 13 (checkpointed there), resumed again: steps 13-20
    equal the straight run's bit for bit."""
    r = launch()[0]
    assert r["stopped_status"] == "preempted" and r["stopped_latest"] == f"step_{RESUME_AT + 1:07d}"
    assert r["resumed_status"] == "completed"
    assert [m["step"] for m in r["resumed"]] == list(range(RESUME_AT + 1, STEPS + 1))
    assert r["resumed"] == r["straight"][RESUME_AT:]


def test_resume_at_another_layout_keeps_the_trajectory():
    r = launch()[0]
    assert r["dp4_status"] == "completed"
    ref = r["straight"][RESUME_AT:]
    assert [m["step"] for m in r["dp4"]] == [m["step"] for m in ref]
    assert _close(r["dp4"], ref) == []


def test_checkpoint_holds_adapters_and_a_reference_to_the_base_only():
    launch()
    base, _ = bases()
    ckpt = WORK / "runs" / "straight" / "checkpoints" / f"step_{STEPS:07d}"
    keys = list(dcp.tensor_metadata(str(ckpt)))
    model_keys = {k for k in keys if "optimizer.state." not in k}
    assert keys and [k for k in keys if ".lora_A." not in k and ".lora_B." not in k] == []
    assert not set(dcp.tensor_metadata(str(base))) & set(keys)
    # A and B of q, k, v, o, experts gate_up and down (layers stacked), 4 ViT linears (blocks stacked), 2 per merger
    assert len(model_keys) == 2 * (6 + 4 + 3 * 2), sorted(model_keys)
    # Adam's moments and fp32 masters (distributed optimizer) of every adapter, and of nothing else
    for state in ("exp_avg", "exp_avg_sq", "param"):
        assert {k.split(f"optimizer.state.{state}.")[1] for k in keys if f"optimizer.state.{state}." in k} == model_keys
    info = json.loads((ckpt / "qwenvl_mcore.json").read_text())
    assert info["kind"] == "lora" and info["base"] == lora_training.base_reference(str(base))


@pytest.mark.parametrize("name,needles", [
    ("other_base", ["was trained on the base", "base", "other_base", "model.init_from="]),
    ("full", ["is a LoRA checkpoint", "peft=lora"]),
    ("rank", ["peft.rank=8 (checkpoint: 4)"]),
])
def test_mismatched_resume_is_refused_before_any_step(name, needles):
    base, other = bases()
    for rank, r in enumerate(launch()):
        error = r[f"{name}_error"]
        assert error is not None and error.startswith("ConfigError"), (rank, error)
        assert all(n in error for n in needles), error
        assert r[f"{name}_steps"] == 0
    if name == "other_base":
        error = launch()[0]["other_base_error"]
        assert str(base) in error and str(other) in error
