"""Parity of qwenvl_mcore's megatron ViT (`VisionModel`) with transformers' `Qwen3VLMoeVisionModel`, at TP1 and TP2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe  # noqa: F401  (hard dependency: fail, never skip)

from qwenvl_mcore.models.qwen3_vl_moe.vision import (  # noqa: E402
    interpolated_position_embeddings,
    vision_cu_seqlens,
    vision_segments,
)
from qwenvl_mcore.testing.dist import run_on_ranks  # noqa: E402

# Two images of different sizes (one larger than the 8x8 learned table, so it is upsampled) and a 3-frame video.
GRIDS = [[1, 4, 6], [1, 10, 12], [3, 4, 4]]
ATOL = 1e-5


def _hf_vision_to_ours(hf: dict, heads: int, tp_rank: int, tp_size: int) -> dict:
    """Map HF `model.visual` tensors (names relative to it) to our parameter names, sliced for one TP rank.

    qkv: HF rows are [q (all heads); k; v]; megatron's are per head [q_h; k_h; v_h]; TP takes a run of heads.
    Column-parallel weights/biases are split on dim 0, row-parallel weights on dim 1 (their bias is replicated).
    """
    def col(t):
        return t.chunk(tp_size, dim=0)[tp_rank]

    def row(t):
        return t.chunk(tp_size, dim=1)[tp_rank]

    def qkv(t):  # [3*h, ...] -> [3, heads, hd, ...] -> [heads, 3, hd, ...] -> this rank's heads
        per_head = t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1)
        return per_head.chunk(tp_size, dim=0)[tp_rank].reshape(-1, *t.shape[1:])

    out = {}
    for name, t in hf.items():
        parts = name.split(".")
        if parts[0] == "blocks":
            b, rest = parts[1], ".".join(parts[2:])
            prefix = f"decoder.layers.{b}."
            simple = {"norm1": "input_layernorm", "norm2": "pre_mlp_layernorm"}
            if parts[2] in simple:
                out[prefix + simple[parts[2]] + "." + parts[3]] = t
            elif rest.startswith("attn.qkv."):
                out[prefix + "self_attention.linear_qkv." + parts[-1]] = qkv(t)
            elif rest == "attn.proj.weight":
                out[prefix + "self_attention.linear_proj.weight"] = row(t)
            elif rest == "attn.proj.bias":
                out[prefix + "self_attention.linear_proj.bias"] = t
            elif rest.startswith("mlp.linear_fc1."):
                out[prefix + rest] = col(t)
            elif rest == "mlp.linear_fc2.weight":
                out[prefix + rest] = row(t)
            elif rest == "mlp.linear_fc2.bias":
                out[prefix + rest] = t
            else:
                raise KeyError(name)
        elif parts[0] in ("merger", "deepstack_merger_list"):
            ours = name.replace("deepstack_merger_list.", "deepstack_mergers.")
            if ".linear_fc1." in name:
                t = col(t)
            elif name.endswith("linear_fc2.weight"):
                t = row(t)
            out[ours] = t
        elif parts[0] in ("patch_embed", "pos_embed"):
            out[name] = t
        else:
            raise KeyError(name)
    return out


@torch.no_grad()
def _copy_hf_vision_weights(ours, hf_visual, tp_rank: int, tp_size: int) -> None:
    """Copy HF vision weights into `ours` (every parameter of ours must be covered, shapes must match)."""
    src = _hf_vision_to_ours(dict(hf_visual.named_parameters()), hf_visual.config.num_heads, tp_rank, tp_size)
    params = dict(ours.named_parameters())
    assert set(src) == set(params), (set(src) ^ set(params))
    for name, p in params.items():
        assert p.shape == src[name].shape, (name, p.shape, src[name].shape)
        p.copy_(src[name])


def _check_parity(rank: int, world_size: int, tp: int) -> dict:
    """Forward/backward parity with transformers on this rank; returns max diffs and this rank's outputs."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, vision_transformer_config
    from qwenvl_mcore.models.qwen3_vl_moe.vision import VisionModel
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from qwenvl_mcore.testing.tiny import randomize_weights, tiny_hf_config

    layout = ParallelLayout(tp=tp)
    init_distributed(layout)
    cfg = tiny_hf_config()
    hf = randomize_weights(Qwen3VLMoeVisionModel(cfg.vision_config), seed=3).float().eval()
    args = args_from_hf_config(cfg)
    ours = VisionModel(args, vision_transformer_config(args, layout)).eval()
    _copy_hf_vision_weights(ours, hf, tp_rank=rank % tp, tp_size=tp)

    gen = torch.Generator().manual_seed(7)
    grid = torch.tensor(GRIDS, dtype=torch.long)
    n = int(grid.prod(-1).sum())
    pixels = torch.randn(n, 3 * 2 * 16 * 16, generator=gen)

    ref = hf(pixels, grid_thw=grid)
    merged, deepstack = ours(pixels, grid)
    res = {
        "n_deepstack": (len(ref.deepstack_features), len(deepstack)),
        "merged_shape": tuple(merged.shape),
        "merged": (merged - ref.pooler_output).abs().max().item(),
        "deepstack": [(a - b).abs().max().item() for a, b in zip(deepstack, ref.deepstack_features)],
        "merged_out": merged.detach(),
        "blocks_impl": ours.blocks_impl(),
    }

    # The same scalar on both sides: random projections of every output.
    weights = [torch.randn(merged.shape, generator=gen) for _ in range(1 + len(deepstack))]

    def scalar(outs):
        return sum((o * w).sum() for o, w in zip(outs, weights))

    scalar([ref.pooler_output, *ref.deepstack_features]).backward()
    scalar([merged, *deepstack]).backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    res["grads_missing_or_nonfinite"] = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    ref_grads = _hf_vision_to_ours({n: p.grad for n, p in hf.named_parameters()}, cfg.vision_config.num_heads,
                                   rank % tp, tp)
    res["grad_rel"] = max(
        ((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
        for n in grads if grads[n] is not None
    )
    return res


@pytest.fixture(scope="module")
def tp1():
    return run_on_ranks(_check_parity, 1, 1)


@pytest.fixture(scope="module")
def tp2():
    return run_on_ranks(_check_parity, 2, 2)


def _assert_parity(res: dict) -> None:
    n = sum(t * h * w for t, h, w in GRIDS)
    assert res["n_deepstack"] == (2, 2)
    assert res["merged_shape"] == (n // 4, 48)
    assert res["merged"] <= ATOL, res["merged"]
    assert max(res["deepstack"]) <= ATOL, res["deepstack"]
    assert res["grads_missing_or_nonfinite"] == []
    assert res["grad_rel"] <= 1e-4, res["grad_rel"]


def test_vision_tp1_matches_transformers(tp1):
    """At TP1 the merged and every DeepStack output equal transformers' ViT (fp32, max abs diff <= 1e-5), and
    gradients of a scalar of all outputs are finite on every parameter and equal transformers' (rel. 1e-4). The
    blocks run on plain torch ops there (vision_blocks.py)."""
    _assert_parity(tp1[0])
    assert tp1[0]["blocks_impl"] == "torch"


def test_vision_tp2_matches_transformers(tp2):
    """At TP2 (2 gloo ranks) each rank's outputs equal transformers' (fp32, <= 1e-5), are identical across the TP
    ranks, and each rank's gradient shards are finite and equal the matching slices of transformers' gradients."""
    for res in tp2:
        _assert_parity(res)
        assert res["blocks_impl"] == "megatron"  # megatron's modules at TP>1
    assert torch.equal(tp2[0]["merged_out"], tp2[1]["merged_out"])


def test_attention_segments_are_block_diagonal_per_frame():
    """`vision_segments` are one bidirectional h*w segment per frame of each image/video (`vision_cu_seqlens`
    names the same boundaries); their mask separates every pair of patches not in the same frame."""
    grid = torch.tensor([[1, 2, 2], [2, 2, 4]])
    assert vision_cu_seqlens(grid).tolist() == [0, 4, 12, 20]
    segments = vision_segments(grid)
    assert not segments.causal and segments.cu_seqlens.tolist() == [0, 4, 12, 20]
    mask = segments.dense_mask()
    assert mask.shape == (1, 1, 20, 20) and mask.dtype == torch.bool
    seg = torch.tensor([0] * 4 + [1] * 8 + [2] * 8)
    assert torch.equal(mask[0, 0], seg[:, None] != seg[None, :])


@pytest.mark.parametrize("h,w", [(3, 5), (8, 8), (12, 10), (1, 4)])
def test_position_interpolation_is_bilinear_align_corners(h, w):
    """With merge size 1, the interpolated positions equal F.interpolate(bilinear, align_corners=True) of the
    learned square table to the h x w grid, in raster order; a 2-frame grid repeats them per frame."""
    side, hidden = 8, 5
    table = torch.randn(side * side, hidden, generator=torch.Generator().manual_seed(0))
    got = interpolated_position_embeddings(table, torch.tensor([[2, h, w]]), spatial_merge_size=1)
    want = F.interpolate(table.T.reshape(1, hidden, side, side), size=(h, w), mode="bilinear", align_corners=True)
    want = want[0].reshape(hidden, h * w).T
    torch.testing.assert_close(got, torch.cat([want, want]), atol=1e-5, rtol=1e-5)
