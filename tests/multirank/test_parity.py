"""Logit, loss, gradient and MRoPE parity with transformers' Qwen3VLMoeForConditionalGeneration at several layouts.

One multi-rank launch per layout runs every check (tests/multirank/_parity_checks.py); the tests assert on its numbers.
"""

from __future__ import annotations

import functools

import pytest

from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.dist import run_on_ranks

from _parity_checks import parity_checks, parity_checks_in_turn

LAYOUTS = {
    "tp1_ep1": (1, dict()),
    "tp2_ep2_sp": (4, dict(tp=2, ep=2, sequence_parallel=True)),
    "tp1_ep4": (4, dict(ep=4)),
    "ep2_etp2": (4, dict(ep=2, etp=2)),
    "pp2_tp2_ep2_sp": (4, dict(pp=2, tp=2, ep=2, sequence_parallel=True)),
    # interleaved 1F1B: 8 LLM layers in 4 virtual stages of 2 (DeepStack's two target layers on the first)
    "pp2_vpp2": (2, dict(pp=2, vpp=2), dict(num_hidden_layers=8)),
    # uneven stages (parallel.first_stage_layers / last_stage_layers), both in one 3-rank launch (SHARED_LAUNCHES):
    # 2/1/1 of the 4 layers (DeepStack's two target layers on the first stage), and interleaved 4/2/2 of 8 layers
    # (virtual stages of 2/1/1: chunk 0 of rank 0 holds layers 0-1, the DeepStack targets)
    "pp3_uneven": (3, dict(pp=3, first_stage_layers=2, last_stage_layers=1)),
    "pp3_vpp2_uneven": (3, dict(pp=3, vpp=2, first_stage_layers=4, last_stage_layers=2), dict(num_hidden_layers=8)),
}
SHARED_LAUNCHES = (("pp3_uneven", "pp3_vpp2_uneven"),)
LOGIT_TOL, LOSS_TOL, GRAD_TOL = 1e-4, 1e-5, 1e-4
# Layouts whose launch also runs the packed-row checks (one rank as the reference, TP2xEP2 with SP, and PP2).
PACKED_LAYOUTS = ("tp1_ep1", "tp2_ep2_sp", "pp2_tp2_ep2_sp")
# The launch that also runs the batched-ViT checks (_vision_batch_checks.py; one rank: tests/unit/test_vision_batch.py)
VISION_BATCH_LAYOUT = "pp2_tp2_ep2_sp"
# Context-parallel layouts, each checked inside the launch of a layout with as many ranks (no launch of their own):
# name -> (host layout, layout kwargs). See _context_parallel_checks.cp_parity_checks.
CP_LAYOUTS = {
    "cp2": ("pp2_vpp2", dict(cp=2)),
    "cp2_tp2_sp": ("tp2_ep2_sp", dict(cp=2, tp=2, sequence_parallel=True)),
    "cp2_ep2": ("tp2_ep2_sp", dict(cp=2, ep=2)),
    "cp4": ("tp2_ep2_sp", dict(cp=4)),
    # one image (a single ViT frame) and a text: three of the four CP ranks have no share of the frames
    "cp4_one_frame": ("tp2_ep2_sp", dict(cp=4, kinds=("image", "text"))),
    "cp2_pp2": ("pp2_tp2_ep2_sp", dict(cp=2, pp=2)),
}


@functools.cache
def _launch(name: str):
    world, layout, *hf_overrides = LAYOUTS[name]
    shared = next((names for names in SHARED_LAUNCHES if name in names), None)
    if shared:
        per_rank = _shared_launch(shared)
        return name, layout, [results[shared.index(name)] for results in per_rank]
    cp_layouts = {cp: kwargs for cp, (host, kwargs) in CP_LAYOUTS.items() if host == name}
    return name, layout, run_on_ranks(parity_checks, world, layout, True, *hf_overrides,
                                      packed=name in PACKED_LAYOUTS, cp_layouts=cp_layouts,
                                      vision_batch=name == VISION_BATCH_LAYOUT)


@functools.cache
def _shared_launch(names: tuple[str, ...]):
    """One launch running the layouts `names` (same world size, no packed checks) in turn."""
    (world,) = {LAYOUTS[n][0] for n in names}
    return run_on_ranks(parity_checks_in_turn, world, [(LAYOUTS[n][1], True, *LAYOUTS[n][2:]) for n in names])


@pytest.fixture(scope="module", params=list(LAYOUTS))
def launch(request):
    return _launch(request.param)


def test_logits_and_loss_match_transformers(launch):
    """Every sample kind: max |dlogit| <= 1e-4 and |dloss| <= 1e-5 on every last-stage rank, top-1 identical."""
    name, _, results = launch
    last = [r for r in results if r["last_stage"]]
    assert last and all(r["forward"] for r in last)
    for rank, result in enumerate(results):
        assert set(result["forward"]) == set(tiny.SAMPLE_KINDS)
        for kind, r in result["forward"].items():
            if not result["last_stage"]:
                assert r is None  # logits exist on the last stage only
                continue
            assert r["max_abs_logit_diff"] <= LOGIT_TOL, (name, rank, kind, r)
            assert r["loss_diff"] <= LOSS_TOL, (name, rank, kind, r)
            assert r["top1_agreement"] == 1.0, (name, rank, kind, r)


def test_stages_hold_the_layers_the_layout_gives_them(launch):
    """Each rank's model chunks hold the LLM layers ParallelLayout.rank_layers names (even and uneven stages)."""
    from qwenvl_mcore.parallel import ParallelLayout

    name, layout, results = launch
    for result in results:
        expected = ParallelLayout(**layout).rank_layers(result["num_layers"], result["pp_rank"])
        assert result["layers"] == [list(r) for r in expected], (name, result["pp_rank"], result["layers"])
    if ParallelLayout(**layout).uneven:
        assert len({len(sum(r["layers"], [])) for r in results}) > 1, name  # the stages differ in size


def test_uneven_stages_give_the_one_rank_loss():
    """Uneven PP3 (2/1/1 layers): every sample kind's loss equals the one-rank launch's within 1e-5, and the
    max |dlogit| to transformers is as small (1e-4)."""
    one_rank = _launch("tp1_ep1")[2][0]["forward"]
    last = [r["forward"] for r in _launch("pp3_uneven")[2] if r["last_stage"]]
    assert len(last) == 1
    for kind, r in last[0].items():
        assert abs(r["loss"] - one_rank[kind]["loss"]) <= LOSS_TOL, (kind, r["loss"], one_rank[kind]["loss"])
        assert r["max_abs_logit_diff"] <= LOGIT_TOL and one_rank[kind]["max_abs_logit_diff"] <= LOGIT_TOL


def test_mrope_position_ids_equal_transformers(launch):
    """Our position ids equal transformers' get_rope_index for every sample kind."""
    _, _, results = launch
    assert set(results[0]["rope"]) == set(tiny.SAMPLE_KINDS)
    assert all(results[0]["rope"].values()), results[0]["rope"]


def test_gradients_match_transformers(launch):
    """After one backward through megatron's schedule, every parameter's gradient (gathered to full HF tensors,
    each pipeline stage its own) matches within 1e-4 relative; together the stages cover every HF parameter."""
    name, _, results = launch
    covered = set()
    for rank, result in enumerate(results):
        r = result["grad"]
        assert r["max_rel_grad_diff"] <= GRAD_TOL, (name, rank, r)
        covered |= set(r["compared"])
    assert len(covered) == results[0]["n_hf_params"], sorted(covered)


def test_aux_loss_value_and_gradients_match_transformers(launch):
    """With the load-balancing loss (coefficient 0.5, padded batch): transformers' value over all layers within
    1e-6 on every rank (pipeline stages included) and every gradient within 1e-4 relative."""
    name, _, results = launch
    covered = set()
    for rank, result in enumerate(results):
        r = result["grad_aux"]
        assert r["max_rel_grad_diff"] <= GRAD_TOL, (name, rank, r)
        assert r["aux_loss_diff"] <= 1e-6, (name, rank, r)
        covered |= set(r["compared"])
    assert len(covered) == results[0]["n_hf_params"], sorted(covered)


@pytest.fixture(scope="module", params=PACKED_LAYOUTS)
def packed_launch(request):
    return _launch(request.param)


def test_packed_row_matches_transformers_and_one_rank(packed_launch):
    """A packed row (text, image, image + video, odd length) through megatron's schedule: each sample's loss equals
    transformers' loss of the sample alone and the one-rank packed loss within 1e-5 on every last-stage rank."""
    name, _, results = packed_launch
    one_rank = _launch("tp1_ep1")[2][0]["packed"]["packed_loss"]
    last = [r["packed"] for r in results if r["last_stage"]]
    assert last and all(r["packed"]["packed_loss"] is None for r in results if not r["last_stage"])
    for rank, r in enumerate(last):
        assert len(r["packed_loss"]) == len(r["hf_loss"]) == 3
        for ours, ref, single in zip(r["packed_loss"], r["hf_loss"], one_rank):
            assert abs(ours - ref) <= LOSS_TOL, (name, rank, r["packed_loss"], r["hf_loss"])
            assert abs(ours - single) <= LOSS_TOL, (name, rank, r["packed_loss"], one_rank)


def test_packed_gradients_and_routing(packed_launch):
    """Gradients of the packed row's summed token losses equal those of the samples run as separate micro-batches
    (1e-5 relative, every parameter of every stage); the routing statistics count top_k x real tokens per layer;
    experts receive as many (token, expert) pairs for the packed row (7 padding tokens) as for the separate,
    heavily padded micro-batches, and none for an all-padding row, whose loss is 0."""
    name, _, results = packed_launch
    for rank, result in enumerate(results):
        r = result["packed"]
        assert r["grad_rel"] <= 1e-5, (name, rank, r["grad_rel"], r["grad_worst"])
        assert r["grad_zero"] == [], (name, rank, r["grad_zero"])
        assert r["routing_tokens"] == r["num_layers"] * r["real_tokens"], (name, rank, r)
        assert r["routing_assignments"] == r["top_k"] * r["routing_tokens"], (name, rank, r)
        assert r["dispatched_packed"] == r["dispatched_alone"] > 0, (name, rank, r)
        assert r["dispatched_empty"] == 0, (name, rank, r)
        if result["last_stage"]:
            assert r["empty_loss"] == 0.0 and r["empty_finite"], (name, rank, r)


def test_vision_batch_equals_the_vit_per_micro_batch():
    """PP2 (1F1B) x TP2 x EP2 with SP, four two-row micro-batches (images and videos interleaved, one without any):
    the ViT once over all of them, in groups of two, and in groups of three and one, against once per micro-batch:
    every gradient of every rank within 1e-6 relative and the same losses; one ViT call per group on the first
    stage's ranks (none on the second); each micro-batch's features of one call equal its own; two whole training
    steps (DDP, distributed Adam, finalize_model_grads) give the same losses, grad norms and aux losses (1e-6)."""
    results = _launch(VISION_BATCH_LAYOUT)[2]
    assert len(results) == 4 and {r["vision_batch"]["pp_rank"] for r in results} == {0, 1}
    for rank, result in enumerate(results):
        r = result["vision_batch"]
        first = r["pp_rank"] == 0
        g = r["gradients"]
        assert g["calls_per_microbatch"] == (6 if first else 0), (rank, g)
        for value, s in g["settings"].items():
            assert s["calls"] == ({0: 1, 2: 2, 3: 2}[value] if first else 0), (rank, value, s)
            assert s["vision_rel"] <= 1e-6 and s["other_rel"] <= 1e-6, (rank, value, s)
            assert s["loss_diff"] <= 1e-6 and s["losses"] == (0 if first else 4), (rank, value, s)
        if first:
            assert g["vision_params"] > 20 and g["vision_grad_max"] > 0, (rank, g)
            assert r["features"]["compared"] == 9 and r["features"]["feature_rel"] <= 1e-6, (rank, r["features"])
        else:
            assert g["vision_params"] == 0 and r["features"] is None
        ref = r["steps"][1]
        for value, got in r["steps"].items():
            for (loss, norm, aux), (loss_r, norm_r, aux_r) in zip(got, ref, strict=True):
                assert abs(loss - loss_r) <= 1e-6 * abs(loss_r) and abs(norm - norm_r) <= 1e-6 * abs(norm_r), (
                    rank, value, got, ref)
                assert abs(aux - aux_r) <= 1e-6, (rank, value, got, ref)


@pytest.mark.parametrize("cp_name", list(CP_LAYOUTS))
def test_context_parallel_matches_transformers(cp_name):
    """A packed row (image + video, text, image, video samples, lengths not all multiples of 2*cp, 5 padding tokens;
    at cp4_one_frame an image and a text)
    split over the CP ranks: on every last-stage rank each sample's logits within 1e-4 of transformers' (top-1
    identical) and its loss within 1e-5, the row's global token-mean loss (sums and counts over DP x CP) within 1e-5
    with the full token count; on every rank the position ids its rotary received equal transformers' ids of each
    sample at that rank's positions, the aux loss within 1e-6, the routers counted every real token once per layer,
    and every gradient (LM token sum + 0.5 x aux) within 1e-4 relative; the stages together cover every parameter;
    the ViT's patches are encoded once over the CP ranks, each rank a share. Each one-row sample kind, unpacked:
    logits within 1e-4, loss within 1e-5 (the CP ranks' loss sums and counts added)."""
    host, _ = CP_LAYOUTS[cp_name]
    results = _launch(host)[2]
    covered = set()
    for rank, result in enumerate(results):
        r = result["cp"][cp_name]
        assert any(n % r["two_cp"] for n in r["lengths"]) and r["pad"] > 0, r["lengths"]
        assert r["rope_equal"], (cp_name, rank)
        assert r["aux_diff"] <= 1e-6, (cp_name, rank, r["aux_diff"])
        assert r["routing_tokens"][0] == r["routing_tokens"][1], (cp_name, rank, r["routing_tokens"])
        assert r["grad_rel"] <= GRAD_TOL, (cp_name, rank, r["grad_rel"], r["grad_worst"])
        covered |= set(r["compared"])
        if r["last_stage"]:
            assert len(r["logit_diff"]) == len(r["lengths"]) and all(r["top1"]), (cp_name, rank, r)
            assert max(r["logit_diff"]) <= LOGIT_TOL, (cp_name, rank, r["logit_diff"])
            assert max(r["loss_diff"]) <= LOSS_TOL, (cp_name, rank, r["loss_diff"])
            assert r["row_loss_diff"] <= LOSS_TOL, (cp_name, rank, r["row_loss_diff"])
            assert r["row_tokens"][0] == r["row_tokens"][1], (cp_name, rank, r["row_tokens"])
            assert len(r["single_rows"]) == len(tiny.SAMPLE_KINDS) - 1  # all but the two-row padded batch
            for kind, f in r["single_rows"].items():  # unpacked one-row batches
                assert f["max_abs_logit_diff"] <= LOGIT_TOL and f["loss_diff"] <= LOSS_TOL, (cp_name, kind, f)
                assert f["top1_agreement"] == 1.0, (cp_name, kind, f)
        else:
            assert "logit_diff" not in r
    assert any(result["cp"][cp_name]["last_stage"] for result in results)
    assert len(covered) == results[0]["cp"][cp_name]["n_hf_params"], sorted(covered)
    # the ViT's work is spread: each first-stage rank encodes a share, the CP ranks together every patch once
    vit = [result["cp"][cp_name]["vit_patches"] for result in results if "vit_patches" in result["cp"][cp_name]]
    cp = results[0]["cp"][cp_name]["two_cp"] // 2
    assert vit and sum(mine for mine, _ in vit) * cp == vit[0][1] * len(vit), vit
    if cp_name == "cp4_one_frame":  # one rank encodes the frame, the others have no share but took part
        assert sorted(mine for mine, _ in vit) == [0] * (3 * len(vit) // 4) + [vit[0][1]] * (len(vit) // 4), vit
    else:
        assert all(0 < mine < total for mine, total in vit), vit
    # with the ViT and merger frozen the step completes (no rank waits for another's exchange), their grads None
    for result in results:
        r = result["cp"][cp_name]
        assert r["frozen_vit_no_grad"] and r["frozen_vit_loss_finite"], (cp_name, r)
