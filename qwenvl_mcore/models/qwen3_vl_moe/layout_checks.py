"""Whether Qwen3-VL MoE's dimensions fit a parallel layout: the model checks its own divisibility.

The layout (qwenvl_mcore/parallel/layout.py) knows parallel sizes and how layers are cut into pipeline stages; what
must divide by them (heads, widths, experts, the layer count) and what must sit on the first stage (the ViT and
every DeepStack target layer) is the model's to say. Each failure is a LayoutError naming the field and the fix.
"""

from __future__ import annotations

from qwenvl_mcore.models.qwen3_vl_moe.config import Qwen3VLMoeArgs
from qwenvl_mcore.parallel.layout import LayoutError, ParallelLayout


def validate_layout(args: Qwen3VLMoeArgs, layout: ParallelLayout, world_size: int | None = None) -> ParallelLayout:
    """The layout's own checks (world size when given), then the model's: raise LayoutError or return `layout`."""
    layout.validate(world_size=world_size)
    text, vision = args.text, args.vision
    tp, ep, etp = layout.tp, layout.ep, layout.etp
    if text.num_attention_heads % tp:
        raise LayoutError(
            f"parallel.tp={tp} does not divide the LLM's {text.num_attention_heads} attention heads: "
            "choose a tp that divides it."
        )
    if text.num_key_value_heads % tp:
        raise LayoutError(
            f"parallel.tp={tp} does not divide the LLM's {text.num_key_value_heads} KV heads "
            f"(text_config.num_key_value_heads): choose tp in "
            f"{[d for d in range(1, text.num_key_value_heads + 1) if text.num_key_value_heads % d == 0]}."
        )
    if vision.num_heads % tp:
        raise LayoutError(
            f"parallel.tp={tp} does not divide the ViT's {vision.num_heads} heads "
            "(vision_config.num_heads): choose a tp that divides it."
        )
    for what, size in (
        ("ViT MLP width (vision_config.intermediate_size)", vision.intermediate_size),
        ("merger width (4*vision hidden)", vision.hidden_size * vision.spatial_merge_size**2),
        ("vocabulary (text_config.vocab_size)", text.vocab_size),
    ):
        if size % tp:
            raise LayoutError(f"parallel.tp={tp} does not divide the {what} {size}: choose a tp that divides it.")
    if text.num_experts % ep:
        raise LayoutError(
            f"parallel.ep={ep} does not divide the {text.num_experts} experts (text_config.num_experts): "
            "choose an ep that divides it."
        )
    if text.moe_intermediate_size % etp:
        raise LayoutError(
            f"parallel.etp={etp} does not divide moe_intermediate_size={text.moe_intermediate_size}: "
            "choose an etp that divides it."
        )
    if tp > 1 and not layout.sequence_parallel:
        raise LayoutError(
            f"parallel.tp={tp} with MoE layers needs sequence parallelism (megatron's MoE layer requires it): "
            "set parallel.sequence_parallel=true."
        )
    _check_first_stage(args, layout)
    return layout


def _check_first_stage(args: Qwen3VLMoeArgs, layout: ParallelLayout) -> None:
    """The layers split over the stages, and DeepStack's target layers all on the first (virtual) stage with the
    ViT: its features exist only there."""
    n_layers = args.text.num_hidden_layers
    layout.stage_sizes(n_layers)  # LayoutError when the stage sizes cannot hold the layers
    first = layout.stage_layers(n_layers, 0, 0 if layout.vpp else None)
    n_deepstack = len(args.vision.deepstack_visual_indexes)
    if n_deepstack <= len(first):
        return
    vpp = layout.vpp or 1
    stages = layout.pp * vpp
    where = "pipeline stage" if vpp == 1 else f"virtual stage (1/{vpp} of pipeline rank 0's layers)"
    if layout.uneven:
        fix = (f"set parallel.first_stage_layers={n_deepstack * vpp} or more"
               + (f" (a multiple of parallel.vpp={vpp})" if vpp > 1 else ""))
    else:
        fix = (f"use fewer stages (at most {n_layers // n_deepstack}), or give the first stage more layers "
               f"(parallel.first_stage_layers={n_deepstack * vpp} or more)")
    raise LayoutError(
        f"DeepStack adds visual features after LLM layers 0..{n_deepstack - 1}, which must all sit on the first "
        f"{where} with the ViT, but pp*vpp={stages} with {_split(layout)} leaves only {len(first)} layers there: "
        f"{fix}."
    )


def _split(layout: ParallelLayout) -> str:
    if not layout.uneven:
        return "an even split"
    return " and ".join(f"parallel.{n}={getattr(layout, n)}" for n in ("first_stage_layers", "last_stage_layers")
                        if getattr(layout, n) is not None)
