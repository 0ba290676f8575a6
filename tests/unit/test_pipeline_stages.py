"""Uneven pipeline stages (parallel.first_stage_layers / last_stage_layers): ParallelLayout.stage_layers is megatron's
placement for every even and uneven split, with and without virtual stages; the model's TransformerConfig carries the
split; impossible splits and DeepStack layers off the first stage fail naming the field and the fix."""

from __future__ import annotations

import itertools

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.config import (
    args_from_hf_config,
    flavor_hf_config,
    language_transformer_config,
)
from qwenvl_mcore.models.qwen3_vl_moe.layout_checks import validate_layout
from qwenvl_mcore.parallel import LayoutError, ParallelLayout


def _splits():
    """(num_layers, layout) for every split of 4..12 layers over pp 2..4 (vpp none or 2) that megatron accepts."""
    for num_layers, pp, vpp in itertools.product(range(4, 13), (2, 3, 4), (None, 2)):
        for first, last in itertools.product((None, 1, 2, 3, 4), repeat=2):
            layout = ParallelLayout(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
            try:
                layout.validate(num_layers=num_layers)
            except LayoutError:
                continue
            yield num_layers, layout


def test_stage_layers_are_megatrons_placement():
    """For each accepted split: every (pp rank, virtual stage) holds megatron's offset and layer count
    (get_transformer_layer_offset, get_num_layers_to_build on the TransformerConfig of the same split), and the
    ranges cover the layers once, in order."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    checked = uneven_vpp = 0
    for num_layers, layout in _splits():
        config = TransformerConfig(
            num_layers=num_layers, hidden_size=8, num_attention_heads=1, pipeline_dtype=torch.float32,
            pipeline_model_parallel_size=layout.pp, virtual_pipeline_model_parallel_size=layout.vpp,
            num_layers_in_first_pipeline_stage=layout.first_stage_layers,
            num_layers_in_last_pipeline_stage=layout.last_stage_layers)
        seen = []
        for v in range(layout.vpp or 1):
            for rank in range(layout.pp):
                vp_stage = v if layout.vpp else None
                got = layout.stage_layers(num_layers, rank, vp_stage)
                assert got.start == get_transformer_layer_offset(config, vp_stage, rank), (num_layers, layout, rank, v)
                assert len(got) == get_num_layers_to_build(config, vp_stage, rank), (num_layers, layout, rank, v)
                seen += list(got)
        assert seen == list(range(num_layers)), (num_layers, layout)
        assert sum(layout.stage_sizes(num_layers)) == num_layers
        checked += 1
        uneven_vpp += bool(layout.uneven and layout.vpp)
    assert checked > 300 and uneven_vpp > 30, (checked, uneven_vpp)


def test_we_accept_exactly_the_splits_megatron_can_place():
    """Every split of 4..12 layers: accepted by the layout iff megatron's TransformerConfig takes it and places every
    stage without failing, each stage holding at least one layer and all stages every layer once (megatron-core
    0.19 takes first + last > layers when one middle stage is left: -1 layers there)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    disagree = []
    for num_layers, pp, vpp in itertools.product(range(4, 13), (2, 3, 4), (None, 2)):
        for first, last in itertools.product((None, 1, 2, 3, 4), repeat=2):
            layout = ParallelLayout(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
            try:
                layout.validate(num_layers=num_layers)
                ours = True
            except LayoutError:
                ours = False
            try:
                config = TransformerConfig(
                    num_layers=num_layers, hidden_size=8, num_attention_heads=1, pipeline_dtype=torch.float32,
                    pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                    num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
                placed = []
                for v, rank in itertools.product(range(vpp or 1), range(pp)):
                    vp_stage = v if vpp else None
                    start, count = (get_transformer_layer_offset(config, vp_stage, rank),
                                    get_num_layers_to_build(config, vp_stage, rank))
                    placed += list(range(start, start + count)) if count > 0 else [None]
                theirs = placed == list(range(num_layers))  # megatron takes some sizes that do not add up
            except (ValueError, AssertionError, ZeroDivisionError):
                theirs = False
            if ours != theirs:
                disagree.append((num_layers, pp, vpp, first, last, ours, theirs))
    assert disagree == [], disagree


def test_uneven_examples():
    four = ParallelLayout(pp=3, first_stage_layers=2, last_stage_layers=1)
    assert four.stage_sizes(4) == (2, 1, 1)
    assert [four.stage_layers(4, r) for r in range(3)] == [range(0, 2), range(2, 3), range(3, 4)]
    interleaved = ParallelLayout(pp=3, vpp=2, first_stage_layers=4, last_stage_layers=2)
    assert [interleaved.rank_layers(8, r) for r in range(3)] == [
        [range(0, 2), range(4, 6)], [range(2, 3), range(6, 7)], [range(3, 4), range(7, 8)]]
    # 235B-A22B's 94 layers over 4 stages: 22 on the first, 24 on each other
    assert ParallelLayout(pp=4, first_stage_layers=22).stage_sizes(94) == (22, 24, 24, 24)
    assert ParallelLayout(pp=2, last_stage_layers=3).stage_sizes(4) == (1, 3)


def test_transformer_config_carries_the_split():
    args = args_from_hf_config(flavor_hf_config("debug"))
    config = language_transformer_config(args, ParallelLayout(pp=3, first_stage_layers=2, last_stage_layers=1))
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (2, 1)
    even = language_transformer_config(args, ParallelLayout(pp=2))
    assert even.num_layers_in_first_pipeline_stage is None and even.num_layers_in_last_pipeline_stage is None


def test_the_tiny_model_validates_at_the_tested_uneven_layouts():
    args = args_from_hf_config(flavor_hf_config("debug"))  # 4 layers, DeepStack after layers 0 and 1
    validate_layout(args, ParallelLayout(pp=3, first_stage_layers=2, last_stage_layers=1), 3)
    eight = args_from_hf_config(flavor_hf_config("debug") | {
        "text_config": flavor_hf_config("debug")["text_config"] | {"num_hidden_layers": 8}})
    validate_layout(eight, ParallelLayout(pp=3, vpp=2, first_stage_layers=4, last_stage_layers=2), 3)
    big = args_from_hf_config(flavor_hf_config("qwen3_vl_235b_a22b"))
    validate_layout(big, ParallelLayout(tp=4, pp=4, ep=32, sequence_parallel=True, first_stage_layers=22), 128)


@pytest.mark.parametrize("layout, needles", [
    # DeepStack's 2 target layers (0, 1) need the first stage
    (ParallelLayout(pp=3, first_stage_layers=1, last_stage_layers=2),
     ["DeepStack", "0..1", "parallel.first_stage_layers=1", "only 1 layers", "set parallel.first_stage_layers=2"]),
    (ParallelLayout(pp=4), ["DeepStack", "only 1 layers", "parallel.first_stage_layers=2 or more"]),
    (ParallelLayout(pp=2, vpp=2, first_stage_layers=2), ["DeepStack", "virtual stage",
                                                         "parallel.first_stage_layers=4 or more", "parallel.vpp=2"]),
    # stage sizes that do not add up to the 4 layers
    (ParallelLayout(pp=2, first_stage_layers=2, last_stage_layers=1),
     ["parallel.first_stage_layers=2 and parallel.last_stage_layers=1 sum to 3", "the model has 4",
      "make them sum to 4"]),
    (ParallelLayout(pp=3, first_stage_layers=3, last_stage_layers=1),
     ["leave no layer", "the stage sizes must sum to the layer count"]),
    (ParallelLayout(pp=4, first_stage_layers=2), ["leave 2 layers", "other 3 pipeline stage(s)",
                                                   "positive multiple of 3"]),
    (ParallelLayout(pp=3), ["4 LLM layers do not split evenly over pp*vpp = 3", "parallel.first_stage_layers"]),
    (ParallelLayout(pp=3, vpp=2, first_stage_layers=2, last_stage_layers=1),
     ["parallel.vpp=2", "[2, 1, 1]", "not a multiple of 2"]),
    (ParallelLayout(pp=2, vpp=2, first_stage_layers=2, last_stage_layers=2),
     ["parallel.vpp=2", "no other pipeline stage", "parallel.last_stage_layers=null"]),
    (ParallelLayout(first_stage_layers=2), ["parallel.first_stage_layers=2 needs pipeline parallelism",
                                            "parallel.pp >= 2"]),
    (ParallelLayout(pp=2, last_stage_layers=0), ["parallel.last_stage_layers=0", "positive"]),
])
def test_impossible_splits_name_the_field_and_the_fix(layout, needles):
    args = args_from_hf_config(flavor_hf_config("debug"))
    with pytest.raises(LayoutError) as e:
        validate_layout(args, layout)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_the_trainer_config_takes_the_fields():
    from qwenvl_mcore.training.config import compose, layout_of

    layout = layout_of(compose(["parallel.pp=3", "parallel.first_stage_layers=2", "parallel.last_stage_layers=1"]))
    assert (layout.pp, layout.first_stage_layers, layout.last_stage_layers) == (3, 2, 1)
    assert layout_of(compose([])).first_stage_layers is None
