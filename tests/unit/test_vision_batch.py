"""The ViT once per group of micro-batches (models/qwen3_vl_moe/vision_batch.py, training/schedule.py) against the
ViT once per micro-batch, on one rank in fp32: every micro-batch's features and every gradient within 1e-6
relative, the same losses, two whole training steps (DDP, distributed Adam) with the same losses and grad norms;
frozen ViT (mergers training), frozen ViT and mergers, forward only; the rows' bookkeeping and its errors. The
same gradient, feature and step checks run at PP2 x TP2 x EP2 with SP in tests/multirank/test_parity.py."""

from __future__ import annotations

import functools

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.model import MultimodalInputs
from qwenvl_mcore.models.qwen3_vl_moe.vision_batch import group_count, visual_layout
from qwenvl_mcore.testing.dist import run_on_ranks

from _vision_batch_checks import SETTINGS

TOL = 1e-6
IMG, VID = 7, 8


def _one_rank(rank: int, world: int) -> dict:
    from _vision_batch_checks import _set, _vit_counter, microbatches, vision_batch_checks

    from qwenvl_mcore.models.qwen3_vl_moe.model import parameter_part
    from qwenvl_mcore.parallel import ParallelLayout
    from qwenvl_mcore.testing import parity, tiny
    from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches

    layout = ParallelLayout()
    parity.start(layout)
    processor = tiny.build_processor(tiny.build_tokenizer())
    hf = tiny.build_tiny_hf_model(tiny.tiny_hf_config(processor.tokenizer), seed=0).eval()
    chunks, _ = parity.build_pair(hf, layout)
    out = vision_batch_checks(chunks, hf, processor, layout)
    micro = microbatches(processor, chunks[0].args)
    model = chunks[0]

    # frozen ViT (mergers train), then ViT and mergers frozen: the grads of what trains, and what the ViT got
    def grads(value: int) -> dict:
        _set(chunks, value)
        model.train()
        model.zero_grad(set_to_none=True)
        run_microbatches(chunks, micro, forward_only=False, loss_for=loss_for_per_token)
        return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    frozen = {}
    for parts in (("vision",), ("vision", "merger")):
        for n, p in model.named_parameters():
            p.requires_grad_(parameter_part(n) not in parts)
        a, b = grads(1), grads(0)
        frozen["+".join(parts)] = {
            "none_equal": [n for n in a if (a[n] is None) != (b[n] is None)],
            "frozen_with_grad": [n for n in b if parameter_part(n) in parts and b[n] is not None],
            "rel": max(float((b[n] - a[n]).abs().max() / a[n].abs().max().clamp_min(1e-12))
                       for n in a if a[n] is not None)}
    for p in model.parameters():
        p.requires_grad_(True)
    out["frozen"] = frozen

    # forward only (no autograd, as the evaluator runs): the same losses, one ViT call instead of one per micro-batch
    calls, hooks = _vit_counter(chunks)
    forward = {}
    for value in (1, 0):
        _set(chunks, value)
        calls.clear()
        with torch.no_grad():
            reports = run_microbatches(chunks, micro, forward_only=True, loss_for=loss_for_per_token)
        forward[value] = ([float(r["loss_sum"]) for r in reports], len(calls))
    for h in hooks:
        h.remove()
    out["forward_only"] = forward
    return out


@functools.cache
def one_rank() -> dict:
    return run_on_ranks(_one_rank, 1)[0]


def test_features_of_one_vit_call_equal_each_micro_batch_alone():
    f = one_rank()["features"]
    assert f["calls"] == 1 and f["compared"] == 3 * 3  # three micro-batches with images: merged + 2 DeepStack
    assert f["feature_rel"] <= TOL, f


def test_gradients_and_losses_equal_the_vit_per_micro_batch():
    g = one_rank()["gradients"]
    assert g["calls_per_microbatch"] == 6  # today's path: images and videos apart, per micro-batch with any
    assert g["vision_params"] > 20 and g["vision_grad_max"] > 0
    expected_calls = {0: 1, 2: 2, 3: 2}
    for value in SETTINGS:
        r = g["settings"][value]
        assert r["calls"] == expected_calls[value], (value, r)
        assert r["losses"] == 4 and r["loss_diff"] <= TOL, (value, r)
        assert r["vision_rel"] <= TOL and r["other_rel"] <= TOL, (value, r)


def test_training_steps_equal_the_vit_per_micro_batch():
    steps = one_rank()["steps"]
    ref = steps[1]
    for value, got in steps.items():
        for (loss, norm, aux), (loss_r, norm_r, aux_r) in zip(got, ref, strict=True):
            assert abs(loss - loss_r) <= TOL * abs(loss_r), (value, got, ref)
            assert abs(norm - norm_r) <= TOL * abs(norm_r), (value, got, ref)
            assert abs(aux - aux_r) <= TOL, (value, got, ref)
    assert ref[0][0] != ref[1][0]  # the second step starts from updated weights


def test_frozen_vision_and_mergers():
    for parts, r in one_rank()["frozen"].items():
        assert r["none_equal"] == [] and r["frozen_with_grad"] == [], (parts, r)
        assert r["rel"] <= TOL, (parts, r)


def test_forward_only_is_batched_too():
    f = one_rank()["forward_only"]
    (ref, ref_calls), (got, calls) = f[1], f[0]
    assert ref_calls == 6 and calls == 1
    assert all(abs(a - b) <= TOL * abs(b) for a, b in zip(got, ref, strict=True)), (got, ref)


# -- bookkeeping -----------------------------------------------------------------------------------------------------
def _batch(ids, images=(), videos=()):
    """ids with IMG/VID placeholders; grids (t, h, w) with merge 2 (h*w/4 tokens per frame)."""
    def pix(grids):
        if not grids:
            return None, None
        grid = torch.tensor(grids)
        return torch.randn(int(grid.prod(1).sum()), 3), grid
    pi, gi = pix(images)
    pv, gv = pix(videos)
    return MultimodalInputs(input_ids=torch.tensor(ids), pixel_values=pi, image_grid_thw=gi,
                            pixel_values_videos=pv, video_grid_thw=gv)


def test_rows_follow_token_order_batch_major():
    # row 0: a video (2 tokens), row 1: an image (1 token) then a video (1 token): ViT order image, videos
    b = _batch([[VID, VID, 0], [IMG, VID, 0]], images=[(1, 2, 2)], videos=[(2, 2, 2), (1, 2, 2)])
    v = visual_layout(b, image_token_id=IMG, video_token_id=VID, merge_size=2)
    assert v.n_tokens == 4 and v.order.tolist() == [1, 2, 0, 3]
    only_images = visual_layout(_batch([[IMG, 0, IMG]], images=[(1, 2, 2), (1, 2, 2)]),
                                image_token_id=IMG, video_token_id=VID, merge_size=2)
    assert only_images.n_tokens == 2 and only_images.order is None
    assert visual_layout(_batch([[0, 1]]), image_token_id=IMG, video_token_id=VID, merge_size=2) is None


def test_rows_that_do_not_fit_are_refused():
    kw = dict(image_token_id=IMG, video_token_id=VID, merge_size=2)
    with pytest.raises(ValueError, match="2 image placeholder tokens but no image pixels"):
        visual_layout(_batch([[IMG, IMG]]), **kw)
    with pytest.raises(ValueError, match="image features and placeholder tokens do not match: 1 features for 2"):
        visual_layout(_batch([[IMG, IMG]], images=[(1, 2, 2)]), **kw)
    bad = _batch([[IMG]], images=[(1, 2, 2)])
    bad.pixel_values = bad.pixel_values[:3]
    with pytest.raises(ValueError, match="3 patch rows but image_grid_thw"):
        visual_layout(bad, **kw)


def test_group_count():
    assert [group_count(8, g) for g in (0, 1, 2, 3, 8, 20)] == [1, 8, 4, 3, 1, 1]


class _FakeVision(torch.nn.Module):
    """A stand-in ViT: a linear per patch, 4 patches summed per merged token, one 'DeepStack' output."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 5)

    def forward(self, pixels, grid):
        assert grid.device.type == "cpu"  # the grids stay on the host
        x = self.proj(pixels).view(-1, 4, 5).sum(1)
        return x, [2 * x]


@pytest.mark.parametrize("group", [0, 1, 2, 3])
def test_groups_run_backward_once_done_and_stay_within_the_plan(group):
    """Stage 0 of PP2 under 1F1B (F0 F1 B0 F2 B1 F3 B2 B3; the schedule polls before each forward): a group's ViT
    backward runs once its micro-batches are all done, never more micro-batches' graphs live than the memory
    planner counts, and the ViT's gradient equals that of the features used one micro-batch at a time."""
    from qwenvl_mcore.models.qwen3_vl_moe.vision_batch import VisionBatches
    from qwenvl_mcore.training.memory import vision_alive_microbatches

    torch.manual_seed(0)
    micro = [_batch([[IMG, 0, IMG]], images=[(1, 2, 2), (1, 2, 2)]), _batch([[0, 0, 0]]),
             _batch([[VID, IMG, 0]], images=[(1, 2, 2)], videos=[(1, 2, 2)]), _batch([[IMG, 0, 0]], images=[(1, 2, 2)])]
    vision = _FakeVision()
    weights = [torch.randn(3, 5) for _ in micro]

    def loss(i, features):
        merged, deep = features
        n = merged.shape[0]
        return (merged * weights[i][:n]).sum() + (deep[0] * weights[i][:n]).sum() * 0.5

    # reference: each micro-batch's features from its own call, in token order
    vision.zero_grad()
    for i, mb in enumerate(micro):
        one = VisionBatches([mb], 0, image_token_id=IMG, video_token_id=VID, merge_size=2)
        f = one.features(0, vision)
        if f is not None:
            loss(i, (f.merged, f.deepstack)).backward()
            one.backward_all()
    ref = vision.proj.weight.grad.clone()

    vision.zero_grad()
    batches = VisionBatches(micro, group, image_token_id=IMG, video_token_id=VID, merge_size=2)
    pending, done = {}, set()
    order = [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    for what, i in order:
        if what == "F":
            batches.backward_ready()
            # every group whose micro-batches have all had their backward has had its ViT backward
            assert all(g.finished for g in batches.groups if g.ran and set(g.indices) <= done), (what, i)
            f = batches.features(i, vision)
            pending[i] = None if f is None else loss(i, (f.merged, f.deepstack))
        else:
            if pending[i] is not None:
                pending[i].backward()
            done.add(i)
    batches.backward_all()
    diff = float((vision.proj.weight.grad - ref).abs().max() / ref.abs().max())
    assert diff <= 1e-6, diff
    assert batches.peak_alive <= vision_alive_microbatches(group, len(micro), 2.0)
    assert batches.calls == {0: 1, 1: 3, 2: 2, 3: 2}[group]
    assert all(g.finished and g.outputs is None for g in batches.groups if g.rows)
