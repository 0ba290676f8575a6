"""Config parsing (both key spellings), real presets on the meta device, and up-front layout validation."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.config import ModelConfigError, args_from_hf_config, flavor_hf_config
from qwenvl_mcore.models.qwen3_vl_moe.layout_checks import validate_layout
from qwenvl_mcore.parallel import LayoutError, ParallelLayout


def _hf_meta_model(cfg: dict):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    with torch.device("meta"):
        return Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**copy.deepcopy(cfg)))


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_by_hand(cfg: dict) -> int:
    """Parameters of Qwen3-VL MoE computed from the config alone (released layout, untied LM head)."""
    t, v = cfg["text_config"], cfg["vision_config"]
    h, heads, kv, d = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    e, f, vocab, layers = t["num_experts"], t["moe_intermediate_size"], t["vocab_size"], t["num_hidden_layers"]
    attn = h * heads * d + 2 * h * kv * d + heads * d * h + 2 * d
    moe = e * h + e * h * 2 * f + e * f * h
    llm = layers * (attn + moe + 2 * h) + h + 2 * vocab * h
    vh, vi, depth, out = v["hidden_size"], v["intermediate_size"], v["depth"], v["out_hidden_size"]
    patch = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * vh + vh
    block = 2 * 2 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh)
    m = vh * v["spatial_merge_size"] ** 2
    merger = (m * m + m) + (m * out + out)
    vit = patch + v["num_position_embeddings"] * vh + depth * block + (2 * vh + merger) \
        + len(v["deepstack_visual_indexes"]) * (2 * m + merger)
    return llm + vit


def test_30b_preset_counts_the_released_total_on_meta():
    """The 30B-A3B preset builds on the meta device with exactly 31,070,754,032 parameters (the release)."""
    cfg = flavor_hf_config("qwen3_vl_30b_a3b")
    args = args_from_hf_config(cfg)
    assert args.text.num_experts == 128 and args.text.mrope_section == (24, 20, 20)
    assert _count_by_hand(cfg) == 31_070_754_032
    model = _hf_meta_model(cfg)
    assert _param_count(model) == 31_070_754_032
    ours = _our_meta_count(cfg)
    print(f"30B-A3B: {ours:,} parameters in our model")
    assert ours == 31_070_754_032


def test_235b_preset_builds_and_matches_count_by_hand():
    """The 235B-A22B preset builds on meta; its count equals the count computed from its config by hand."""
    cfg = flavor_hf_config("qwen3_vl_235b_a22b")
    ours = _our_meta_count(cfg)
    print(f"235B-A22B: {ours:,} parameters")
    assert ours == _count_by_hand(cfg) == 235_670_022_896


def _our_meta_count(cfg: dict) -> int:
    from qwenvl_mcore.testing.dist import run_on_ranks

    return run_on_ranks(_meta_count_rank, 1, cfg)[0]


def _meta_count_rank(rank, world, cfg):
    from qwenvl_mcore.models.qwen3_vl_moe.model import Qwen3VLMoeModel
    from qwenvl_mcore.parallel import init_distributed

    init_distributed(ParallelLayout())
    args = args_from_hf_config(cfg)
    with torch.device("meta"):
        model = Qwen3VLMoeModel(args, ParallelLayout(), dtype=torch.bfloat16, use_cpu_initialization=False,
                                perform_initialization=False)
    return sum(p.numel() for p in model.parameters())


def test_both_key_spellings_give_the_same_args():
    """Released (4.57) and transformers-5 spellings of config.json parse to the same architecture."""
    from qwenvl_mcore.testing import tiny

    tf5 = tiny.tiny_hf_config().to_dict()
    from qwenvl_mcore.models.qwen3_vl_moe.config import released_config_dict

    released = released_config_dict(tiny.tiny_hf_config())
    assert "num_experts" in released["text_config"] and "rope_scaling" in released["text_config"]
    assert args_from_hf_config(tf5).as_dict() == args_from_hf_config(released).as_dict()


@pytest.mark.parametrize(
    "layout, world, needle",
    [
        (ParallelLayout(tp=3, sequence_parallel=True), 3, "tp=3 does not divide the LLM's 32 attention heads"),
        (ParallelLayout(tp=8, sequence_parallel=True), 8, "does not divide the LLM's 4 KV heads"),
        (ParallelLayout(ep=3), 3, "parallel.ep=3 does not divide the 128 experts"),
        (ParallelLayout(tp=2), 2, "sequence_parallel=true"),
        (ParallelLayout(pp=24), 24, "DeepStack"),
        (ParallelLayout(etp=5), 5, "etp=5"),
        (ParallelLayout(tp=2, sequence_parallel=True), 3, "world size 3"),
        (ParallelLayout(vpp=2), 1, "parallel.vpp=2 needs pipeline"),
        (ParallelLayout(cp=2, tp=2, sequence_parallel=True), 6, r"tp\*pp\*cp = 2\*1\*2"),
    ],
)
def test_impossible_layouts_fail_naming_field_and_fix(layout, world, needle):
    """An impossible layout fails before anything is built, with a message naming the field and the fix."""
    args = args_from_hf_config(flavor_hf_config("qwen3_vl_30b_a3b"))
    with pytest.raises(LayoutError, match=needle):
        validate_layout(args, layout, world)


def test_valid_real_layouts_pass():
    """The layouts a 30B-A3B user runs validate."""
    args = args_from_hf_config(flavor_hf_config("qwen3_vl_30b_a3b"))
    for layout, world in ((ParallelLayout(tp=2, ep=8, sequence_parallel=True), 16), (ParallelLayout(pp=2, ep=8), 16),
                          (ParallelLayout(ep=8, etp=1), 8), (ParallelLayout(tp=4, pp=4, ep=8, sequence_parallel=True), 64)):
        validate_layout(args, layout, world)


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(model_type="qwen2_vl"), "model_type"),
    (lambda c: c["text_config"].pop("num_experts"), "num_experts"),
    (lambda c: c["text_config"]["rope_scaling"].update(mrope_section=[24, 20, 10]), "mrope_section"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[8, 40]), "deepstack_visual_indexes"),
    (lambda c: c["vision_config"].update(out_hidden_size=1024), "out_hidden_size"),
])
def test_bad_configs_fail_naming_the_key(mutate, needle):
    """A config.json the model cannot be built from fails naming the key."""
    cfg = copy.deepcopy(flavor_hf_config("qwen3_vl_30b_a3b"))
    mutate(cfg)
    with pytest.raises(ModelConfigError, match=needle):
        args_from_hf_config(cfg)
