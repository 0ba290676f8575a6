"""Parity of qwenvl_mcore's rotary code with transformers' Qwen3-VL MoE (position ids, text MRoPE, vision 2D rope)."""

from __future__ import annotations

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.rope import (
    MRotaryEmbedding,
    VisionRotaryEmbedding,
    apply_rotary,
    get_rope_index,
    mrope_slot_axes,
    position_ids_for_sample,
    vision_patch_positions,
    vision_rotary_angles,
)

import transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe as hf_mod  # a hard dependency: fail, never skip
from transformers import Qwen3VLMoeConfig  # noqa: E402
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig  # noqa: E402
from transformers.vision_utils import get_vision_position_ids  # noqa: E402

# Token ids of the tiny vocabulary (text ids are drawn from [1, TEXT_MAX)).
PAD, TEXT_MAX = 0, 50
VS, VE, IMG, VID = 58, 59, 60, 61
MERGE = 2
TOKENS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, spatial_merge_size=MERGE)


def _tiny_config() -> Qwen3VLMoeConfig:
    return Qwen3VLMoeConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            num_hidden_layers=1,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_experts=2,
            num_experts_per_tok=1,
            rope_parameters=dict(
                rope_type="default", rope_theta=5000000, mrope_section=[6, 5, 5], mrope_interleaved=True
            ),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=64,
            num_heads=2,
            intermediate_size=32,
            out_hidden_size=64,
            deepstack_visual_indexes=[0],
            num_position_embeddings=16,
            spatial_merge_size=MERGE,
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return hf_mod.Qwen3VLMoeModel(_tiny_config()).eval()


# ---------------------------------------------------------------- synthetic token layouts (as the processor emits)


class _Seq:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.ids: list[int] = []
        self.images: list[list[int]] = []
        self.videos: list[list[int]] = []

    def text(self, n: int) -> _Seq:
        self.ids += torch.randint(1, TEXT_MAX, (n,), generator=self.g).tolist()
        return self

    def image(self, t: int, h: int, w: int) -> _Seq:
        # "<|vision_start|>" + "<|image_pad|>" * (t*h*w / merge^2) + "<|vision_end|>"
        self.ids += [VS] + [IMG] * (t * h * w // MERGE**2) + [VE]
        self.images.append([t, h, w])
        return self

    def video(self, t: int, h: int, w: int) -> _Seq:
        # transformers 5.x: the chat template's "<|vision_start|><|video_pad|><|vision_end|>" keeps its wrapper and
        # the processor expands the inner <|video_pad|> into, per frame, "<{sec:.1f} seconds>" + "<|vision_start|>"
        # + "<|video_pad|>" * (h*w / merge^2) + "<|vision_end|>".  A timestamp is a few ordinary text tokens.
        self.ids.append(VS)
        for _ in range(t):
            self.text(4)
            self.ids += [VS] + [VID] * (h * w // MERGE**2) + [VE]
        self.ids.append(VE)
        self.videos.append([t, h, w])
        return self


def _grids(rows):
    return torch.tensor(rows, dtype=torch.long) if rows else None


def _mm_types(input_ids: torch.Tensor) -> torch.Tensor:
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == IMG] = 1
    types[input_ids == VID] = 2
    return types


def _hf_rope_index(model, input_ids, image_grid, video_grid, attention_mask=None):
    return model.get_rope_index(
        input_ids,
        _mm_types(input_ids),
        image_grid_thw=image_grid,
        video_grid_thw=video_grid,
        attention_mask=attention_mask,
    )


def _batch(seqs: list[_Seq], padding_side: str):
    length = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[i, sl] = torch.tensor(s.ids)
        mask[i, sl] = 1
    images = [g for s in seqs for g in s.images]
    videos = [g for s in seqs for g in s.videos]
    return ids, mask, _grids(images), _grids(videos)


SAMPLES = {
    "text_only": lambda: _Seq(1).text(17),
    "one_image": lambda: _Seq(2).text(5).image(1, 8, 12).text(7),
    "two_images_different_sizes": lambda: _Seq(3).text(3).image(1, 4, 6).text(2).image(1, 10, 4).text(6),
    "multi_frame_video": lambda: _Seq(4).text(6).video(3, 6, 8).text(5),
    "image_and_video": lambda: _Seq(5).text(4).image(1, 6, 6).text(3).video(2, 4, 10).text(2).image(1, 2, 8).text(3),
    "two_videos_then_image": lambda: _Seq(6).video(2, 4, 4).text(2).video(1, 8, 6).image(1, 12, 2).text(1),
}


# ------------------------------------------------------------------------------------------------ position ids


@pytest.mark.parametrize("name", list(SAMPLES))
def test_get_rope_index_matches_transformers_single_sample(hf_model, name):
    """Position ids [3,1,s] and deltas [1,1] equal transformers' get_rope_index for one unpadded sample."""
    seq = SAMPLES[name]()
    ids = torch.tensor([seq.ids])
    image_grid, video_grid = _grids(seq.images), _grids(seq.videos)
    video_before = None if video_grid is None else video_grid.clone()

    ref_pos, ref_delta = _hf_rope_index(hf_model, ids, image_grid, video_grid)
    pos, delta = get_rope_index(ids, image_grid, video_grid, **TOKENS)

    assert pos.shape == (3, 1, len(seq.ids)) and delta.shape == (1, 1)
    assert pos.dtype == ref_pos.dtype and delta.dtype == ref_delta.dtype == torch.long
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta)
    # The per-sample building block gives the same row; the caller's grids are not modified.
    assert torch.equal(position_ids_for_sample(ids[0], image_grid, video_grid, **TOKENS), ref_pos[:, 0])
    if video_before is not None:
        assert torch.equal(video_grid, video_before)


def test_video_frames_are_split_with_temporal_grid_one():
    """Each video frame is its own block: t position = block start, frames advance by max(h, w)/merge + timestamp."""
    seq = _Seq(7).video(2, 4, 6)  # frames of 2x3 merged tokens, each preceded by 4 timestamp tokens + <vs>
    pos = position_ids_for_sample(torch.tensor(seq.ids), None, _grids(seq.videos), **TOKENS)
    frame_starts = [i for i, tok in enumerate(seq.ids) if tok == VID and seq.ids[i - 1] == VS]
    # outer <vs> (0), 4 timestamp tokens (1..4), inner <vs> (5) -> frame 0 starts at position 6
    assert pos[:, frame_starts[0]].tolist() == [6, 6, 6]
    # frame 0 spans 3 positions (max(4, 6) / 2), then <ve>, 4 timestamp tokens, <vs>: 6 + 3 + 6 = 15
    assert pos[:, frame_starts[1]].tolist() == [15, 15, 15]
    # inside a frame t stays, h and w follow the merged grid
    assert pos[:, frame_starts[0] : frame_starts[0] + 6].tolist() == [
        [6] * 6,
        [6, 6, 6, 7, 7, 7],
        [6, 7, 8, 6, 7, 8],
    ]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_get_rope_index_padded_batch_matches_transformers(hf_model, padding_side):
    """Padded batch of two: positions over attended tokens only, zeros at padding, deltas as transformers."""
    seqs = [SAMPLES["image_and_video"](), SAMPLES["one_image"]()]
    ids, mask, image_grid, video_grid = _batch(seqs, padding_side)
    assert (mask == 0).any()

    ref_pos, ref_delta = _hf_rope_index(hf_model, ids, image_grid, video_grid, mask)
    pos, delta = get_rope_index(ids, image_grid, video_grid, mask, **TOKENS)

    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta)
    assert (pos[:, mask == 0] == 0).all()
    for i, s in enumerate(seqs):
        row = position_ids_for_sample(torch.tensor(s.ids), _grids(s.images), _grids(s.videos), **TOKENS)
        assert torch.equal(pos[:, i, mask[i].bool()], row)


def test_get_rope_index_rejects_placeholder_grid_mismatch():
    """A placeholder run whose length, grid or <|vision_start|> does not match raises ValueError."""
    seq = SAMPLES["one_image"]()
    ids = torch.tensor([seq.ids])
    with pytest.raises(ValueError, match="has 24 tokens"):
        get_rope_index(ids, torch.tensor([[1, 8, 10]]), **TOKENS)  # grid gives 20 tokens
    with pytest.raises(ValueError, match="no grid left"):
        get_rope_index(ids, None, **TOKENS)
    with pytest.raises(ValueError, match="2 image grid"):
        get_rope_index(ids, torch.tensor([[1, 8, 12], [1, 2, 2]]), **TOKENS)  # surplus grid
    bad = list(seq.ids)
    bad[bad.index(VS)] = 1
    with pytest.raises(ValueError, match="vision_start"):
        get_rope_index(torch.tensor([bad]), _grids(seq.images), **TOKENS)


# ------------------------------------------------------------------------------------------------ text MRoPE


def _random_positions(b: int, s: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6000, (3, b, s), generator=g)


def _hf_text_rotary(head_dim: int, theta, section):
    cfg = Qwen3VLMoeTextConfig(
        hidden_size=64,
        num_attention_heads=2,
        head_dim=head_dim,
        rope_parameters=dict(rope_type="default", rope_theta=theta, mrope_section=list(section)),
    )
    return hf_mod.Qwen3VLMoeTextRotaryEmbedding(cfg)


def test_mrope_slot_axes_interleave_t_h_w():
    """With [24, 20, 20] the 64 frequency slots cycle T,H,W for 60 slots, then 4 T slots; contiguous is 3 blocks."""
    axes = mrope_slot_axes(128, [24, 20, 20]).tolist()
    assert axes == [0, 1, 2] * 20 + [0] * 4
    assert [axes.count(a) for a in range(3)] == [24, 20, 20]
    assert mrope_slot_axes(128, [16, 24, 24], interleaved=False).tolist() == [0] * 16 + [1] * 24 + [2] * 24
    with pytest.raises(ValueError, match="sum"):
        mrope_slot_axes(128, [24, 20, 16])


@pytest.mark.parametrize("head_dim,section", [(32, (6, 5, 5)), (128, (24, 20, 20))])
def test_mrotary_cos_sin_match_transformers(head_dim, section):
    """cos/sin of MRotaryEmbedding angles [s,b,1,d] permuted to [b,s,d] equal transformers' text rotary (1e-6)."""
    theta = 5000000
    hf_rot = _hf_text_rotary(head_dim, theta, section)
    ours = MRotaryEmbedding(head_dim, float(theta), section)
    assert torch.equal(ours.inv_freq, hf_rot.inv_freq)

    position_ids = _random_positions(2, 37, seed=head_dim)
    angles = ours(position_ids)
    assert angles.shape == (37, 2, 1, head_dim) and angles.dtype == torch.float32
    ref_cos, ref_sin = hf_rot(torch.zeros(1, dtype=torch.float32), position_ids)
    emb = angles.squeeze(2).permute(1, 0, 2)
    torch.testing.assert_close(emb.cos(), ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(emb.sin(), ref_sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mrotary_apply_matches_transformers(dtype):
    """Rotating q/k [s,b,h,d] by MRotaryEmbedding angles (megatron path) equals transformers' apply_rotary_pos_emb."""
    head_dim, section, theta = 128, (24, 20, 20), 5000000
    hf_rot = _hf_text_rotary(head_dim, theta, section)
    ours = MRotaryEmbedding(head_dim, theta, section)
    b, s = 2, 23
    position_ids = _random_positions(b, s, seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(b, 4, s, head_dim, generator=g).to(dtype)  # transformers: [b, heads, s, d]
    k = torch.randn(b, 2, s, head_dim, generator=g).to(dtype)

    cos, sin = hf_rot(q, position_ids)
    ref_q, ref_k = hf_mod.apply_rotary_pos_emb(q, k, cos, sin)

    angles = ours(position_ids)
    out_q = apply_rotary(q.permute(2, 0, 1, 3), angles).permute(1, 2, 0, 3)
    out_k = apply_rotary(k.permute(2, 0, 1, 3), angles).permute(1, 2, 0, 3)
    assert out_q.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(out_q, ref_q, atol=atol, rtol=0)
    torch.testing.assert_close(out_k, ref_k, atol=atol, rtol=0)


def test_mrotary_contiguous_sections_match_qwen2vl():
    """interleaved=False gives contiguous T|H|W sections: cos/sin equal transformers' Qwen2-VL rotary (1e-6)."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    section = (4, 6, 6)
    cfg = Qwen2VLTextConfig(
        hidden_size=64,
        num_attention_heads=2,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=list(section)),
    )
    hf_rot = Qwen2VLRotaryEmbedding(cfg)
    ours = MRotaryEmbedding(32, 1000000.0, section, interleaved=False)
    position_ids = _random_positions(2, 11, seed=5)
    ref_cos, ref_sin = hf_rot(torch.zeros(1), position_ids)
    emb = ours(position_ids).squeeze(2).permute(1, 0, 2)
    torch.testing.assert_close(emb.cos(), ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(emb.sin(), ref_sin, atol=1e-6, rtol=0)


def test_mrotary_inv_freq_stays_float32_on_module_cast():
    """Casting the module to bf16 keeps inv_freq float32 and the angles unchanged; the buffer is not saved."""
    ours = MRotaryEmbedding(128, 5000000.0, (24, 20, 20))
    position_ids = _random_positions(1, 9, seed=3)
    before = ours(position_ids)
    ours = torch.nn.Sequential(ours).bfloat16()[0]
    assert ours.inv_freq.dtype == torch.float32
    assert torch.equal(ours(position_ids), before)
    assert ours.state_dict() == {}
    # [b, s] text-only positions broadcast to the three axes
    flat = torch.arange(9).unsqueeze(0)
    assert torch.equal(ours(flat), ours(flat.unsqueeze(0).expand(3, -1, -1)))


# ------------------------------------------------------------------------------------------------ vision rotary

VISION_GRIDS = torch.tensor([[1, 8, 12], [2, 6, 4]])  # an image and a 2-frame video of different sizes


def test_vision_patch_positions_match_transformers():
    """Patch (h, w) coordinates follow transformers' merge-block order exactly."""
    ref = get_vision_position_ids(VISION_GRIDS, MERGE)
    assert torch.equal(vision_patch_positions(VISION_GRIDS, MERGE), ref)


def test_vision_rotary_cos_sin_match_transformers(hf_model):
    """cos/sin of vision_rotary_angles [n,1,1,d] equal transformers' vision rot_pos_emb (1e-6) for two grids."""
    visual = hf_model.visual
    head_dim = visual.config.hidden_size // visual.config.num_heads
    ref_cos, ref_sin = visual.rotary_pos_emb(
        torch.zeros(1), get_vision_position_ids(VISION_GRIDS, visual.spatial_merge_size)
    )
    angles = vision_rotary_angles(VISION_GRIDS, head_dim=head_dim, spatial_merge_size=MERGE)
    n = int((VISION_GRIDS[:, 0] * VISION_GRIDS[:, 1] * VISION_GRIDS[:, 2]).sum())
    assert angles.shape == (n, 1, 1, head_dim) and angles.dtype == torch.float32
    mod = VisionRotaryEmbedding(head_dim, MERGE)
    assert torch.equal(mod.inv_freq, visual.rotary_pos_emb.inv_freq)
    torch.testing.assert_close(angles[:, 0, 0].cos(), ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(angles[:, 0, 0].sin(), ref_sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_rotary_apply_matches_transformers(hf_model, dtype):
    """Rotating q/k [n,1,h,d] via megatron's path (fp32 compute) equals transformers' apply_rotary_pos_emb_vision."""
    visual = hf_model.visual
    heads = visual.config.num_heads
    head_dim = visual.config.hidden_size // heads
    cos, sin = visual.rotary_pos_emb(torch.zeros(1), get_vision_position_ids(VISION_GRIDS, MERGE))
    n = cos.shape[0]
    g = torch.Generator().manual_seed(4)
    q = torch.randn(n, heads, head_dim, generator=g).to(dtype)  # transformers: [seq, heads, d]
    k = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    ref_q, ref_k = hf_mod.apply_rotary_pos_emb_vision(q, k, cos, sin)

    angles = VisionRotaryEmbedding(head_dim, MERGE)(VISION_GRIDS)
    out_q = apply_rotary(q.unsqueeze(1), angles, compute_dtype=torch.float32).squeeze(1)
    out_k = apply_rotary(k, angles, compute_dtype=torch.float32)  # packed [T, h, d] form
    assert out_q.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(out_q, ref_q, atol=atol, rtol=0)
    torch.testing.assert_close(out_k, ref_k, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------ megatron contract


class _SingleRankGroup:
    """Stand-in for a 1-rank context-parallel group (only size()/rank() are read by megatron's rope code)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def test_apply_rotary_equals_megatron_public_entry_point():
    """apply_rotary == megatron apply_rotary_pos_emb (fusion off, rotary_interleaved=False), sbhd and packed thd."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=2, kv_channels=32)
    assert config.apply_rope_fusion is False and config.rotary_interleaved is False
    rot = MRotaryEmbedding(32, 5000000.0, (6, 5, 5))
    g = torch.Generator().manual_seed(6)

    angles = rot(_random_positions(2, 13, seed=7))
    q = torch.randn(13, 2, 2, 32, generator=g)
    ref = apply_rotary_pos_emb(q, angles, config=config, cp_group=_SingleRankGroup())
    assert torch.equal(apply_rotary(q, angles), ref)

    # Packed: two sequences of 5 and 8 tokens, angles given for every packed token.
    packed_angles = rot(_random_positions(1, 13, seed=8))
    qp = torch.randn(13, 2, 32, generator=g)
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    ref = apply_rotary_pos_emb(qp, packed_angles, config=config, cu_seqlens=cu, cp_group=_SingleRankGroup())
    assert torch.equal(apply_rotary(qp, packed_angles), ref)
