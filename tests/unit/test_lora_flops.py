"""Model FLOPs of a LoRA step (qwenvl_mcore/training/metrics.py, the logged TFLOP/s and MFU): the frozen base does
no weight-gradient GEMMs, the adapters add 6 r (in + out) per token each; full training's count is unchanged."""

from __future__ import annotations

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
from qwenvl_mcore.training import metrics
from qwenvl_mcore.training.config import compose
from qwenvl_mcore.training.lora_sites import LoRAShape, resolve_targets

A30 = args_from_hf_config(flavor_hf_config("qwen3_vl_30b_a3b"))
ALL = LoRAShape(16, resolve_targets(["all"]))
GRID = torch.tensor([[1, 32, 32], [2, 16, 24]])  # an image and a two-frame video


def test_full_training_count_is_unchanged():
    """Without LoRA (lora=None, the default) the numbers are the published ones, to the bit."""
    t = A30.text
    h, q, g = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer = 6 * h * (q + 2 * g) + 6 * q * h + 6 * h * t.moe_intermediate_size * t.num_experts_per_tok * 3
    lengths = [3000, 1096]
    expected = float(sum(lengths) * (t.num_hidden_layers * per_layer + 6 * h * t.vocab_size)
                     + t.num_hidden_layers * 6 * q * sum(n * n for n in lengths))
    assert metrics.language_flops(A30, lengths) == expected
    assert metrics.language_flops(A30, lengths, lora=None) == expected
    assert metrics.language_flops(A30, [4096]) / 4096 / 1e9 == pytest.approx(23.01, abs=0.05)
    assert (metrics.vision_flops(A30, GRID, vit_trains=True, merger_trains=True, lora=None)
            == metrics.vision_flops(A30, GRID, vit_trains=True, merger_trains=True))
    assert LoRAShape.of(compose([]).peft) is None  # peft=none: the trainer passes lora=None


def test_lora_language_flops_by_hand():
    """30B-A3B (h 2048, q 4096, g 512, F 768, k 8, E 128, V 151936, 48 layers) at rank 16 on q k v o and both expert
    tensors: base GEMMs x4 instead of x6, LM head 4hV, core attention unchanged, adapters 6r(in + out) per token."""
    n = 4096
    base = 4 * 2048 * (4096 + 2 * 512) + 4 * 4096 * 2048 + 4 * 2048 * 768 * 8 * 3
    adapters = 6 * 16 * ((2048 + 4096) + (2048 + 512) + (2048 + 512) + (4096 + 2048)
                         + 8 * (2048 + 2 * 768) + 8 * (768 + 2048))
    attention = 48 * 6 * 4096 * n * n
    expected = n * (48 * (base + adapters) + 4 * 2048 * 151936) + attention
    assert metrics.language_flops(A30, [n], lora=ALL) == float(expected)
    # without the adapters' share, exactly two thirds of full training's GEMMs
    full = metrics.language_flops(A30, [n])
    assert expected - n * 48 * adapters - attention == pytest.approx((full - attention) * 2 / 3, rel=1e-12)
    # the router, when targeted, adds 6r(h + E) per token and layer
    with_router = LoRAShape(16, resolve_targets(["all", "router"]))
    assert (metrics.language_flops(A30, [n], lora=with_router) - expected) == float(n * 48 * 6 * 16 * (2048 + 128))
    # at 4K a LoRA step is 75% of a full step's model FLOPs (core attention, unchanged, and the adapters keep it
    # above the GEMMs' 2/3)
    assert 0.74 < expected / full < 0.76


def test_lora_vision_flops_by_targets():
    """ViT adapters: base linears x2, core attention x3, mergers x2, plus the adapters; merger adapters only: the
    ViT forward only, merger fc2 x2 (its input gradient reaches fc1's adapter), fc1 x1; none: forward only."""
    v = A30.vision
    hv, inter, m, out = v.hidden_size, v.intermediate_size, v.merged_hidden_size, v.out_hidden_size
    patches = float(GRID.prod(-1).sum())
    attention = float((GRID[:, 0] * (GRID[:, 1] * GRID[:, 2]) ** 2).sum())
    merged = patches / 4
    mergers = 1 + len(v.deepstack_visual_indexes)
    lin = v.depth * (8 * hv * hv + 4 * hv * inter) * patches
    att = v.depth * 4 * hv * attention
    fc1, fc2 = mergers * 2 * merged * m * m, mergers * 2 * merged * m * out
    r = 16
    vit_adapters = v.depth * patches * 6 * r * ((hv + 3 * hv) + (hv + hv) + (hv + inter) + (inter + hv))
    merger_adapters = mergers * merged * 6 * r * ((m + m) + (m + out))

    assert metrics.vision_flops(A30, GRID, lora=ALL) == pytest.approx(
        2 * lin + 3 * att + 2 * fc1 + 2 * fc2 + vit_adapters + merger_adapters, rel=1e-12)
    only_mergers = LoRAShape(r, resolve_targets(["mergers", "attention"]))
    assert metrics.vision_flops(A30, GRID, lora=only_mergers) == pytest.approx(
        lin + att + fc1 + 2 * fc2 + merger_adapters, rel=1e-12)
    llm_only = LoRAShape(r, resolve_targets(["attention", "experts"]))
    forward = metrics.vision_flops(A30, GRID, vit_trains=False, merger_trains=False)
    assert metrics.vision_flops(A30, GRID, lora=llm_only) == pytest.approx(forward, rel=1e-12)
    assert metrics.vision_flops(A30, None, lora=ALL) == 0.0


def test_the_trainer_counts_lora_for_a_lora_run():
    """The LoRA presets' peft group gives the trainer's FLOP count its rank and targets (router left out)."""
    cfg = compose(["experiment=lora_30b_a3b_1x4xh100"])
    shape = LoRAShape.of(cfg.peft)
    assert shape == ALL
    assert "router" not in shape.kinds and shape.vision_trains and shape.merger_trains
