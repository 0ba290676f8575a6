"""LoRA (qwenvl_mcore.lora) against transformers + peft, and frozen-base training, at several layouts.

One launch per layout (tests/multirank/_lora_checks.py) runs every check; the tests assert on its numbers. The
adapter is drawn in peft with every B non-zero, saved, and loaded both by `PeftModel.from_pretrained` (the
reference) and into our model through qwenvl_mcore.lora.peft_io.
"""

from __future__ import annotations

import functools
import tempfile

import pytest

from qwenvl_mcore.lora.config import TARGETS
from qwenvl_mcore.testing.dist import run_on_ranks

from _lora_checks import FORWARD_KINDS, lora_parity_checks

# name: (ranks, layout, launch options). ep2_etp2 runs the experts' grouped GEMM path (torch's grouped_mm, the
# GPU default) for base and adapters alike, and rsLoRA scaling; the others the per-expert loop, the CPU default.
LAYOUTS = {
    "tp1_ep1": (1, dict(), dict(subset=True)),
    "tp2_ep2_sp": (4, dict(tp=2, ep=2, sequence_parallel=True), dict()),
    "ep2_etp2": (4, dict(ep=2, etp=2), dict(train=False, grouped_gemm=True, lora=dict(rslora=True, alpha=3.0))),
    "ep4": (4, dict(ep=4), dict(train=False)),
    "pp2_tp2_ep2_sp": (4, dict(pp=2, tp=2, ep=2, sequence_parallel=True), dict(train=False)),
}
TRAINED = ("tp1_ep1", "tp2_ep2_sp")
PACKED = ("tp1_ep1", "tp2_ep2_sp", "pp2_tp2_ep2_sp")  # layouts whose launch also runs the packed-row checks
LOGIT_TOL, LOSS_TOL, GRAD_TOL = 1e-4, 1e-5, 1e-4
# tiny model: 4 LLM layers x (q, k, v, o, experts gate_up + down, router), 3 ViT blocks x 4, 3 mergers x 2; A and B
N_ADAPTERS = 2 * (4 * 7 + 3 * 4 + 3 * 2)


@functools.cache
def _launch(name: str):
    world, layout, options = LAYOUTS[name]
    with tempfile.TemporaryDirectory(prefix="lora-export-") as export_dir:
        return name, run_on_ranks(lora_parity_checks, world, layout, export_dir=f"{export_dir}/adapter",
                                  packed=name in PACKED, **options)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def launch(request):
    return _launch(request.param)


def test_adapter_loads_from_peft_and_round_trips(launch):
    """peft's saved adapter holds one A and B per target (every kind: 92 tensors); loaded into our model and
    gathered back into peft's names and layout it is bit-identical, and the stages together give every tensor.
    Every adapter is in the model's sharded_state_dict with that same global shape (distributed checkpoints)."""
    name, results = launch
    keys = set()
    for rank, r in enumerate(results):
        assert r["peft_tensors"] == N_ADAPTERS and r["peft_keys_equal"], (name, rank)
        assert r["roundtrip_max_diff"] == 0.0, (name, rank, r["roundtrip_max_diff"])
        assert r["ref_frozen_base"]
        assert r["sharded_mismatch"] == [], (name, rank, r["sharded_mismatch"][:5])
        keys |= set(r["roundtrip_keys"])
    assert len(keys) == N_ADAPTERS


def test_logits_match_transformers_with_peft(launch):
    """Text, image and video: max |dlogit| <= 1e-4 and |dloss| <= 1e-5 against transformers + peft with the same
    adapter (fp32), top-1 identical; the adapter moves our logits by more than 1 (B is not zero)."""
    name, results = launch
    last = [r for r in results if r["last_stage"]]
    assert last
    for rank, r in enumerate(results):
        if not r["last_stage"]:
            assert all(v is None for v in r["forward"].values())
            continue
        assert set(r["forward"]) == set(FORWARD_KINDS)
        for kind, f in r["forward"].items():
            assert f["max_abs_logit_diff"] <= LOGIT_TOL, (name, rank, kind, f)
            assert f["loss_diff"] <= LOSS_TOL, (name, rank, kind, f)
            assert f["top1_agreement"] == 1.0, (name, rank, kind, f)
        assert r["adapter_effect"] > 1.0, (name, rank, r["adapter_effect"])


def test_adapter_gradients_match_transformers_with_peft(launch):
    """After one backward on an image + video sample, every adapter gradient (gathered to peft's global layout)
    equals peft's within 1e-4 relative and none is zero; the stages together cover all of peft's adapter tensors;
    no base parameter of ours has a gradient."""
    name, results = launch
    covered = set()
    for rank, r in enumerate(results):
        assert r["grad_rel"] <= GRAD_TOL, (name, rank, r["grad_rel"], r["grad_worst"])
        assert r["grad_zero"] == [], (name, rank, r["grad_zero"])
        assert r["base_grads"] == [], (name, rank, r["base_grads"][:5])
        covered |= set(r["grad_compared"])
    assert len(covered) == results[0]["n_peft_params"] == N_ADAPTERS


def test_initial_adapters_do_not_depend_on_the_layout(launch):
    """apply_lora draws A per global tensor (B = 0): gathered, every layout's initial adapters equal one rank's."""
    name, results = launch
    one_rank = _launch("tp1_ep1")[1][0]["init_sums"]
    merged = {}
    for r in results:
        merged.update(r["init_sums"])
    assert merged == one_rank, name
    assert all(v == 0.0 for k, v in one_rank.items() if ".lora_B." in k)
    assert all(v != 0.0 for k, v in one_rank.items() if ".lora_A." in k)


@pytest.mark.parametrize("name", PACKED)
def test_packed_row_matches_transformers_with_peft(name):
    """A packed row (text, image, image + video, odd length) with the adapters: each sample's loss equals
    transformers + peft's loss of the sample alone and the one-rank packed loss within 1e-5; the adapters'
    gradients of the packed row's summed token losses equal those of the samples run as separate micro-batches
    (1e-5 relative) and none is zero."""
    _, results = _launch(name)
    one_rank = _launch("tp1_ep1")[1][0]["packed"]["packed_loss"]
    assert any(r["last_stage"] for r in results)
    for rank, result in enumerate(results):
        r = result["packed"]
        if result["last_stage"]:
            assert len(r["packed_loss"]) == len(r["hf_loss"]) == 3
            for ours, ref, single in zip(r["packed_loss"], r["hf_loss"], one_rank):
                assert abs(ours - ref) <= LOSS_TOL, (name, rank, r["packed_loss"], r["hf_loss"])
                assert abs(ours - single) <= LOSS_TOL, (name, rank, r["packed_loss"], one_rank)
        else:
            assert r["packed_loss"] is None
        assert r["grad_rel"] <= 1e-5, (name, rank, r["grad_rel"], r["grad_worst"])
        # packed_checks lists every parameter whose gradient is zero: the frozen base's, no adapter
        assert r["grad_zero"] and not [n for n in r["grad_zero"] if ".lora_" in n], (name, rank, r["grad_zero"])
        assert r["dispatched_packed"] == r["dispatched_alone"] > 0, (name, rank, r)


@pytest.mark.parametrize("name", TRAINED)
def test_training_moves_only_adapters(name):
    """3 steps of megatron DDP + distributed Adam (lr 2e-3) on one batch: the loss falls every step, every base
    tensor is bit-identical afterwards and has no gradient buffer, every adapter tensor moved."""
    _, results = _launch(name)
    for rank, r in enumerate(results):
        t = r["train"]
        assert t["n_base"] > 0
        assert t["base_changed"] == [], (name, rank, t["base_changed"][:5])
        assert t["base_with_grad_buffer"] == [], (name, rank, t["base_with_grad_buffer"][:5])
        assert t["lora_unchanged"] == [], (name, rank, t["lora_unchanged"][:5])
        losses = t["losses"]
        assert all(b < a for a, b in zip(losses, losses[1:])), (name, rank, losses)


def test_only_targeted_modules_get_adapters():
    """targets [k, experts_down, merger_fc2]: exactly those adapters exist (A and B of k in each LLM layer's fused
    qkv, of the experts' down projection, of the 3 mergers' fc2), they are the only trainable tensors, and with
    B = 0 the logits are bit-identical to the model before apply_lora."""
    r = _launch("tp1_ep1")[1][0]["subset"]
    want = sorted(
        [f"decoder.layers.{i}.self_attention.linear_qkv.lora_{ab}.k" for i in range(4) for ab in "AB"]
        + [f"decoder.layers.{i}.mlp.experts.lora_{ab}.experts_down" for i in range(4) for ab in "AB"]
        + [f"vision.{m}.linear_fc2.lora_{ab}.merger_fc2" for m in ("merger", "deepstack_mergers.0",
                                                                   "deepstack_mergers.1") for ab in "AB"])
    assert r["adapters"] == want
    assert r["adapter_params"] == want
    assert r["trainable"] == want
    assert r["zero_b_logits_equal"] is True
    assert len(TARGETS) == 13


@pytest.mark.parametrize("name", TRAINED)
def test_trained_adapters_export_as_peft(name):
    """After training, save_peft_adapter writes an HF PEFT directory (every one of the 92 tensors, bit-identical
    to ours) that PeftModel.from_pretrained loads into transformers with logits within 1e-4 of our model."""
    _, results = _launch(name)
    for rank, r in enumerate(results):
        e = r["export"]
        assert e["tensors_equal"] and e["n_written"] == N_ADAPTERS, (name, rank)
        f = e["forward"]
        if r["last_stage"]:
            assert f["max_abs_logit_diff"] <= LOGIT_TOL and f["top1_agreement"] == 1.0, (name, rank, f)
