"""Sequence packing: first-fit bins, the packed row's layout, and the model on a packed row (each sample isolated,
per-sample MRoPE, padding never routed) against each sample run alone and against transformers."""

from __future__ import annotations

import random

import pytest
import torch

from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.packing import first_fit, pack
from qwenvl_mcore.data.sample import Sample
from qwenvl_mcore.models.qwen3_vl_moe.model import (
    MultimodalInputs,
    _check_packed,
    packed_attention_segments,
    shift_labels,
)
from qwenvl_mcore.models.qwen3_vl_moe.rope import packed_position_ids, position_ids_for_sample
from qwenvl_mcore.testing.dist import run_on_ranks

# ------------------------------------------------------------------------------------------------ first_fit


def _ffd_reference_check(lengths: list[int], capacity: int, bins: list[list[int]]) -> None:
    """Assert that `bins` is what first-fit decreasing must give: replay the items longest first (ties by index)
    and check each sits in the first bin that had room for it at that moment."""
    where = {i: b for b, items in enumerate(bins) for i in items}
    load = [0] * len(bins)
    opened = 0
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = where[i]
        fits = [k for k in range(opened) if load[k] + lengths[i] <= capacity]
        assert b == (fits[0] if fits else opened), (i, b, fits, opened)
        opened = max(opened, b + 1)
        load[b] += lengths[i]


def test_first_fit_known_answer():
    """[3, 7, 2, 5, 5, 1] into 10: 7 opens bin 0, 5 opens bin 1, 5 fills bin 1, 3 fills bin 0, 2 and 1 share bin 2."""
    assert first_fit([3, 7, 2, 5, 5, 1], 10) == [[0, 1], [3, 4], [2, 5]]
    # ties keep input order: equal lengths fill bins in index order
    assert first_fit([4, 4, 4, 4, 4], 8) == [[0, 1], [2, 3], [4]]
    assert first_fit([], 8) == []
    assert first_fit([0, 8, 0], 8) == [[0, 1, 2]]


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_properties(seed):
    """Random lengths: every index exactly once, bins within capacity, indices ascending, bins opened in decreasing
    order of their largest item, each item in the first bin with room (FFD), and the same answer every call."""
    rng = random.Random(seed)
    capacity = rng.randint(20, 200)
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 60))]
    bins = first_fit(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b == sorted(b) for b in bins)
    largest = [max(lengths[i] for i in b) for b in bins]
    assert largest == sorted(largest, reverse=True)
    _ffd_reference_check(lengths, capacity, bins)
    assert first_fit(list(lengths), capacity) == bins
    # never fewer bins than the volume bound
    assert len(bins) >= -(-sum(lengths) // capacity)


def test_first_fit_rejects_overlong_items():
    with pytest.raises(ValueError, match="length 11"):
        first_fit([3, 11, 2], 10)
    with pytest.raises(ValueError):
        first_fit([1], 0)


# ------------------------------------------------------------------------------------------------ pack layout

# Token ids of a made-up vocabulary (as in test_rope): text ids < 50.
PAD, VS, VE, IMG, VID = 0, 58, 59, 60, 61
TOKENS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, spatial_merge_size=2)
PATCH = 12  # pixel row width of these fake samples


def _sample(ids: list[int], trained: list[int], *, images=(), videos=(), fill: float = 0.0) -> Sample:
    """A Sample whose labels train the tokens at positions `trained`; pixel rows hold `fill` (+0.5 for videos)."""
    input_ids = torch.tensor(ids)
    labels = torch.full_like(input_ids, -100)
    labels[trained] = input_ids[trained]

    def pixels(grids, value):
        if not grids:
            return None, None
        grid = torch.tensor(grids)
        return torch.full((int(grid.prod(-1).sum()), PATCH), value), grid

    pv, ig = pixels(list(images), fill)
    pvv, vg = pixels(list(videos), fill + 0.5)
    return Sample(input_ids, labels, pixel_values=pv, image_grid_thw=ig, pixel_values_videos=pvv, video_grid_thw=vg)


def _layout_samples() -> list[Sample]:
    text = _sample([1, 2, 3, 4], [2, 3])
    image = _sample([5, VS, IMG, IMG, IMG, IMG, VE, 6, 7], [7, 8], images=[[1, 4, 4]], fill=1.0)
    # a 2-frame video (temporal grid 2): each frame behind 2 timestamp tokens and its own <|vision_start|>
    video = _sample([8, 9, VS, IMG, VE, 10, 11, VS, VID, VID, VE, 12, 13, VS, VID, VID, VE, 14],
                    [16, 17], images=[[1, 2, 2]], videos=[[2, 2, 4]], fill=2.0)
    return [text, image, video]


def test_pack_layout():
    """ids and attention mask concatenated then right-padded; labels shifted per sample (a sample's last token has
    target -100, never the next sample's first token); cu_seqlens the sample boundaries; pixels in sample order;
    position ids each sample's own, 0 on padding."""
    samples = _layout_samples()
    total = sum(len(s) for s in samples)  # 4 + 9 + 18 = 31
    out = pack(samples, 36, PAD, **TOKENS)
    assert out.input_ids.shape == (1, 36) and out.attention_mask.shape == (1, 36) and out.labels.shape == (1, 36)
    assert out.cu_seqlens.dtype == torch.int32 and out.cu_seqlens.tolist() == [0, 4, 13, 31]
    assert torch.equal(out.input_ids[0, :total], torch.cat([s.input_ids for s in samples]))
    assert out.input_ids[0, total:].tolist() == [PAD] * 5
    assert out.attention_mask[0].tolist() == [1] * total + [0] * 5
    expected_labels = ([-100, 3, 4, -100]  # text: tokens 1 and 2 predict the trained 3 and 4; its last: -100
                       + [-100] * 6 + [6, 7, -100]  # image: its last token's target is -100, not the video's 8
                       + [-100] * 15 + [VE, 14, -100]
                       + [-100] * 5)
    assert out.labels[0].tolist() == expected_labels
    for (a, b), s in zip(zip(out.cu_seqlens[:-1].tolist(), out.cu_seqlens[1:].tolist()), samples):
        assert torch.equal(out.labels[0, a:b], shift_labels(s.labels.unsqueeze(0))[0])
        alone = position_ids_for_sample(s.input_ids, s.image_grid_thw, s.video_grid_thw, **TOKENS)
        assert torch.equal(out.position_ids[:, 0, a:b], alone)
    assert out.position_ids.shape == (3, 1, 36) and (out.position_ids[:, :, total:] == 0).all()
    # every sample starts again at position 0
    assert out.position_ids[:, 0, [0, 4, 13]].tolist() == [[0, 0, 0]] * 3
    # pixels: the image sample's 16 rows (1.0), then the video sample's image (4 rows of 2.0); its video (2.5)
    assert out.pixel_values[:, 0].tolist() == [1.0] * 16 + [2.0] * 4
    assert out.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 2]]
    assert out.pixel_values_videos[:, 0].tolist() == [2.5] * 16 and out.video_grid_thw.tolist() == [[2, 2, 4]]


def test_pack_order_follows_the_given_order_and_checks_capacity():
    """Samples go in the order given (not length order); more tokens than the capacity raise DataError."""
    text, image, video = _layout_samples()
    out = pack([video, text], 22, PAD, **TOKENS)
    assert out.cu_seqlens.tolist() == [0, 18, 22]
    assert out.input_ids[0, 18:].tolist() == [1, 2, 3, 4]
    assert out.pixel_values.shape[0] == 4 and out.pixel_values_videos.shape[0] == 16
    with pytest.raises(DataError, match="more than the packing capacity 21"):
        pack([video, text], 21, PAD, **TOKENS)


def test_pack_empty_is_all_padding():
    """pack([]) is a full row of padding: cu_seqlens [0], no loss tokens, no media."""
    out = pack([], 8, PAD, **TOKENS)
    assert out.cu_seqlens.tolist() == [0]
    assert out.input_ids.tolist() == [[PAD] * 8] and out.attention_mask.sum() == 0
    assert (out.labels == -100).all() and (out.position_ids == 0).all()
    assert out.pixel_values is None and out.pixel_values_videos is None and out.image_grid_thw is None


def test_packed_position_ids_reject_a_boundary_inside_an_image():
    """A sample boundary that cuts an image's placeholder run leaves it without a full grid: ValueError."""
    _, image, _ = _layout_samples()
    with pytest.raises(ValueError, match="packed sample 0"):
        packed_position_ids(image.input_ids, torch.tensor([0, 4, 9]), image.image_grid_thw, **TOKENS)


# ------------------------------------------------------------------------------------------------ model helpers


def test_packed_attention_segments_are_block_diagonal_causal():
    """Samples [0, 2) and [2, 5), padding 5 and 6: causal inside each sample, nothing across, padding sees itself."""
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    segments = packed_attention_segments(cu, 7)
    assert segments.causal and segments.lengths == (2, 3, 1, 1) and segments.max_seqlen == 3
    assert segments.cu_seqlens.dtype == torch.int32 and segments.cu_seqlens.tolist() == [0, 2, 5, 6, 7]
    assert segments.segment_ids().tolist() == [0, 0, 1, 1, 1, 2, 3]
    allowed = (~segments.dense_mask())[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ]
    # one sample filling the row is plain causal attention (no segments); an empty row is padding only
    assert packed_attention_segments(torch.tensor([0, 7]), 7) is None
    assert packed_attention_segments(torch.tensor([0]), 3).lengths == (1, 1, 1)
    # an empty sample in cu_seqlens (two equal boundaries) is no segment
    assert packed_attention_segments(torch.tensor([0, 2, 2, 4]), 4).lengths == (2, 2)


def test_packed_batches_are_validated():
    """A packed micro-batch has b == 1, cu_seqlens rising from 0 within the row, and an attention mask that is 1
    exactly before cu_seqlens[-1] (filled in when missing)."""
    ids = torch.ones(1, 6, dtype=torch.long)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert _check_packed(MultimodalInputs(ids, cu_seqlens=cu)).attention_mask.tolist() == [[1, 1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="batch size 1"):
        _check_packed(MultimodalInputs(torch.ones(2, 6, dtype=torch.long), cu_seqlens=cu))
    with pytest.raises(ValueError, match="rising from 0"):
        _check_packed(MultimodalInputs(ids, cu_seqlens=torch.tensor([0, 4, 2])))
    with pytest.raises(ValueError, match="rising from 0"):
        _check_packed(MultimodalInputs(ids, cu_seqlens=torch.tensor([0, 7])))
    with pytest.raises(ValueError, match="attention_mask"):
        _check_packed(MultimodalInputs(ids, attention_mask=torch.ones(1, 6, dtype=torch.long), cu_seqlens=cu))


# ------------------------------------------------------------------------------------------------ acceptance

KINDS = ("text", "image", "video", "image_video")
PAD_TOKENS = 7  # padding after the samples; odd, so the row length is odd too


def _mm_token_types(ids: torch.Tensor, args) -> torch.Tensor:
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == args.image_token_id] = 1
    types[ids == args.video_token_id] = 2
    return types


def _acceptance(rank: int, world: int) -> dict:
    """One rank, fp32: a packed bin of the 4 sample kinds through our model vs each sample alone and transformers;
    gradients; an all-padding bin; routing of padding. Returns numbers for the tests."""
    from dataclasses import replace

    from qwenvl_mcore.data.collate import collate
    from qwenvl_mcore.data.packing import rope_token_ids
    from qwenvl_mcore.data.synthetic import SyntheticConversations
    from qwenvl_mcore.models.qwen3_vl_moe.routing import RoutingStats
    from qwenvl_mcore.parallel import ParallelLayout
    from qwenvl_mcore.testing import parity, tiny

    layout = ParallelLayout()
    parity.start(layout)
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer)
    hf = tiny.build_tiny_hf_model(tiny.tiny_hf_config(tokenizer), seed=0).eval()
    (model,), _ = parity.build_pair(hf, layout)
    args = model.args
    pad_id = tokenizer.pad_token_id
    samples = [SyntheticConversations(processor, 1, kinds=(kind,), seed=5, max_words=10)[0] for kind in KINDS]
    real = sum(len(s) for s in samples)
    capacity = real + PAD_TOKENS
    packed = pack(samples, capacity, pad_id, **rope_token_ids(args))
    bounds = list(zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist()))
    alone = [collate([s], len(s), pad_id) for s in samples]
    out: dict = {"kinds": [int(s.image_grid_thw is not None) + 2 * int(s.video_grid_thw is not None) for s in samples],
                 "real_tokens": real, "top_k": args.text.num_experts_per_tok}

    # Experts see exactly the (token, expert) pairs dispatched to them: count them per forward.
    dispatched = []
    for layer in model.decoder.layers:
        layer.mlp.experts.register_forward_hook(lambda mod, inp, outp: dispatched.append(int(inp[1].sum())))

    model.eval()
    with torch.no_grad():
        packed_tok = model(packed)[0]
        packed_logits = model(replace(packed, labels=None))[0]
        out["packed_loss"] = [float(packed_tok[a:b].sum()) / s.num_loss_tokens for (a, b), s in zip(bounds, samples)]
        out["alone_loss"], out["hf_loss"], out["logit_diff"], out["rope_equal"] = [], [], [], []
        for (a, b), s, batch in zip(bounds, samples, alone):
            out["alone_loss"].append(float(model(batch).sum()) / s.num_loss_tokens)
            logits = model(replace(batch, labels=None))[0]
            out["logit_diff"].append(float((packed_logits[a:b] - logits).abs().max()))
            ids = s.input_ids.unsqueeze(0)
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                          mm_token_type_ids=_mm_token_types(ids, args),
                          pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                          pixel_values_videos=s.pixel_values_videos, video_grid_thw=s.video_grid_thw)
            hf.model.rope_deltas = None
            out["hf_loss"].append(float(hf(**inputs, labels=s.labels.unsqueeze(0), use_cache=False).loss))
            ref_pos, _ = hf.model.get_rope_index(ids, inputs["mm_token_type_ids"], s.image_grid_thw, s.video_grid_thw,
                                                 attention_mask=inputs["attention_mask"])
            out["rope_equal"].append(bool(torch.equal(packed.position_ids[:, :, a:b], ref_pos)))
        # the model's own per-sample position ids (none given) equal pack()'s
        out["model_rope_equal"] = bool(torch.equal(model.position_ids(replace(packed, position_ids=None)),
                                                   packed.position_ids))
        dispatched.clear()
        model(packed)
        out["eval_dispatched"] = list(dispatched)

    # Gradients: the packed row's summed token losses vs the sum over the samples run alone.
    model.train()
    model.aux_loss_coeff = 0.0
    params = dict(model.named_parameters())

    def grads():
        g = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
        model.zero_grad(set_to_none=True)
        return g

    model.zero_grad(set_to_none=True)
    model.routing = RoutingStats(args.text.num_experts)
    dispatched.clear()
    model(packed).sum().backward()
    out["train_dispatched"] = list(dispatched)
    record = model.routing.micro[0]
    out["routing_counts"] = [float(record.layers[n][0].sum()) for n in sorted(record.layers)]
    out["routing_tokens"] = [float(record.layers[n][2]) for n in sorted(record.layers)]
    g_packed = grads()
    model.routing = None
    for batch in alone:
        model(batch).sum().backward()
    g_alone = grads()
    rel = {n: float((g_packed[n] - g_alone[n]).abs().max() / g_alone[n].abs().max().clamp_min(1e-12)) for n in params}
    out["grad_rel"] = max(rel.values())
    out["grad_worst"] = max(rel, key=rel.get)
    out["grad_zero"] = [n for n in params if float(g_alone[n].abs().max()) == 0.0]

    # An all-padding bin (what evens out micro-batch counts across ranks): runs, finite, zero loss, nothing routed.
    empty = pack([], capacity, pad_id, **rope_token_ids(args))
    model.routing = RoutingStats(args.text.num_experts)
    dispatched.clear()
    tok = model(empty)
    tok.sum().backward()
    record = model.routing.micro[0]
    out["empty"] = {
        "loss_sum": float(tok.sum()), "loss_tokens": int((empty.labels != -100).sum()),
        "finite": bool(torch.isfinite(tok).all()) and all(torch.isfinite(g).all() for g in grads().values()),
        "dispatched": list(dispatched), "routing_counts": sum(float(c.sum()) for c, _, _ in record.layers.values()),
    }
    model.eval()
    with torch.no_grad():
        out["empty"]["logits_finite"] = bool(torch.isfinite(model(replace(empty, labels=None))).all())
    return out


@pytest.fixture(scope="module")
def acceptance():
    return run_on_ranks(_acceptance, 1)[0]


def test_packed_bin_holds_every_sample_kind(acceptance):
    """The bin holds a text, an image, a video and an image + video sample, followed by padding."""
    assert acceptance["kinds"] == [0, 1, 2, 3]


def test_packed_per_sample_losses_equal_alone_and_transformers(acceptance):
    """Per-sample loss of the packed bin (its segment's token losses / its loss tokens) equals the sample run alone
    through our model and through transformers within 1e-5; its logits equal the lone run's within 1e-4."""
    for kind, p, a, h, d in zip(KINDS, acceptance["packed_loss"], acceptance["alone_loss"], acceptance["hf_loss"],
                                acceptance["logit_diff"]):
        assert abs(p - a) <= 1e-5, (kind, p, a)
        assert abs(p - h) <= 1e-5, (kind, p, h)
        assert d <= 1e-4, (kind, d)


def test_packed_position_ids_equal_transformers_per_sample(acceptance):
    """pack()'s position ids are transformers' get_rope_index of each sample alone, concatenated; the model
    computes the same ones itself from cu_seqlens when none are given."""
    assert acceptance["rope_equal"] == [True] * len(KINDS)
    assert acceptance["model_rope_equal"]


def test_packed_gradients_equal_sum_of_unpacked(acceptance):
    """Gradients of the packed row's summed token loss equal those of the samples' summed losses run alone
    (every parameter, 1e-5 relative to its largest entry)."""
    assert acceptance["grad_rel"] <= 1e-5, (acceptance["grad_rel"], acceptance["grad_worst"])
    assert acceptance["grad_zero"] == []


def test_padding_is_never_routed(acceptance):
    """Experts receive top_k x real tokens per layer (padding none), in eval and training, and the routing
    statistics count the same and only the real tokens."""
    expected = acceptance["top_k"] * acceptance["real_tokens"]
    layers = len(acceptance["routing_counts"])
    assert layers == 4
    assert acceptance["eval_dispatched"] == [expected] * layers
    assert acceptance["train_dispatched"] == [expected] * layers
    assert acceptance["routing_counts"] == [expected] * layers
    assert acceptance["routing_tokens"] == [acceptance["real_tokens"]] * layers


def test_all_padding_bin_has_zero_loss(acceptance):
    """pack([]) through the model: loss 0 over 0 loss tokens, finite outputs and gradients, no token routed."""
    empty = acceptance["empty"]
    assert empty["loss_sum"] == 0.0 and empty["loss_tokens"] == 0
    assert empty["finite"] and empty["logits_finite"]
    assert empty["dispatched"] == [0] * 4 and empty["routing_counts"] == 0.0
