"""THE mapping between transformers' Qwen3-VL MoE tensors and ours, used in both directions.

Each rule pairs one megatron parameter (global layer numbers {L}, ViT blocks {B}, DeepStack mergers {D}) with
the HF tensors it is made of, and the transform each way (qwenvl_mcore.conversion.transforms). Names are those
of the released checkpoint (checkpoint_layout.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from qwenvl_mcore.conversion import transforms as T
from qwenvl_mcore.models.qwen3_vl_moe.config import Qwen3VLMoeArgs

Tensors = Sequence[torch.Tensor]


@dataclass(frozen=True)
class Context:
    """What transforms need besides the tensors: the architecture and the experts' on-disk layout."""

    args: Qwen3VLMoeArgs
    expert_layout: str | None = None  # None: decide from each tensor's shape (to mcore); released (to HF)


def _identity_in(ts: Tensors, ctx: Context) -> torch.Tensor:
    return ts[0]


def _identity_out(t: torch.Tensor, ctx: Context) -> list[torch.Tensor]:
    return [t]


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    to_mcore: Callable[[Tensors, Context], torch.Tensor] = _identity_in
    to_hf: Callable[[torch.Tensor, Context], list[torch.Tensor]] = _identity_out


def _llm_qkv_in(ts: Tensors, ctx: Context) -> torch.Tensor:
    t = ctx.args.text
    return T.qkv_to_mcore(*ts, num_heads=t.num_attention_heads, num_groups=t.num_key_value_heads, head_dim=t.head_dim)


def _llm_qkv_out(qkv: torch.Tensor, ctx: Context) -> list[torch.Tensor]:
    t = ctx.args.text
    return list(T.qkv_from_mcore(qkv, num_heads=t.num_attention_heads, num_groups=t.num_key_value_heads,
                                 head_dim=t.head_dim))


def _vit_qkv_in(ts: Tensors, ctx: Context) -> torch.Tensor:
    v = ctx.args.vision
    return T.qkv_to_mcore(*T.split_stacked_qkv(ts[0]), num_heads=v.num_heads, num_groups=v.num_heads,
                          head_dim=v.head_dim)


def _vit_qkv_out(qkv: torch.Tensor, ctx: Context) -> list[torch.Tensor]:
    v = ctx.args.vision
    return [T.stack_qkv(*T.qkv_from_mcore(qkv, num_heads=v.num_heads, num_groups=v.num_heads, head_dim=v.head_dim))]


def _expert_layout(gate_up: torch.Tensor, ctx: Context) -> str:
    if ctx.expert_layout is not None:
        return ctx.expert_layout
    t = ctx.args.text
    return T.expert_layout_of(gate_up, num_experts=t.num_experts, hidden=t.hidden_size, ffn=t.moe_intermediate_size)


def _gate_up_in(ts: Tensors, ctx: Context) -> torch.Tensor:
    return T.gate_up_to_mcore(ts[0], _expert_layout(ts[0], ctx))


def _gate_up_out(w: torch.Tensor, ctx: Context) -> list[torch.Tensor]:
    return [T.gate_up_from_mcore(w, ctx.expert_layout or T.RELEASED)]


def _down_in(ts: Tensors, ctx: Context) -> torch.Tensor:
    t = ctx.args.text
    layout = ctx.expert_layout
    if layout is None:  # down_proj's own shape decides: [E, F, h] released, [E, h, F] transformers 5
        released, tf5 = (t.num_experts, t.moe_intermediate_size, t.hidden_size), (
            t.num_experts, t.hidden_size, t.moe_intermediate_size)
        shape = tuple(ts[0].shape)
        if shape == released and shape != tf5:
            layout = T.RELEASED
        elif shape == tf5 and shape != released:
            layout = T.TRANSFORMERS5
        else:
            raise T.LayoutMismatch(
                f"down_proj has shape {list(shape)}; expected {list(released)} (released) or {list(tf5)} "
                "(transformers 5) for this config, or pass the expert layout explicitly."
            )
    return T.down_to_mcore(ts[0], layout)


def _down_out(w: torch.Tensor, ctx: Context) -> list[torch.Tensor]:
    return [T.down_from_mcore(w, ctx.expert_layout or T.RELEASED)]


LM = "model.language_model"
VIT = "model.visual"


def _plain(mcore: str, hf: str) -> Rule:
    return Rule(mcore, (hf,))


def _vit_linear(mcore_prefix: str, hf_prefix: str) -> list[Rule]:
    return [_plain(f"{mcore_prefix}.{p}", f"{hf_prefix}.{p}") for p in ("weight", "bias")]


def _merger(mcore_prefix: str, hf_prefix: str) -> list[Rule]:
    return [r for part in ("norm", "linear_fc1", "linear_fc2") for r in _vit_linear(f"{mcore_prefix}.{part}",
                                                                                   f"{hf_prefix}.{part}")]


RULES: tuple[Rule, ...] = (
    # language model
    _plain("embedding.weight", f"{LM}.embed_tokens.weight"),
    _plain("output_layer.weight", "lm_head.weight"),
    _plain("decoder.final_layernorm.weight", f"{LM}.norm.weight"),
    _plain("decoder.layers.{L}.input_layernorm.weight", f"{LM}.layers.{{L}}.input_layernorm.weight"),
    Rule("decoder.layers.{L}.self_attention.linear_qkv.weight",
         tuple(f"{LM}.layers.{{L}}.self_attn.{p}_proj.weight" for p in "qkv"), _llm_qkv_in, _llm_qkv_out),
    _plain("decoder.layers.{L}.self_attention.linear_proj.weight", f"{LM}.layers.{{L}}.self_attn.o_proj.weight"),
    _plain("decoder.layers.{L}.self_attention.q_layernorm.weight", f"{LM}.layers.{{L}}.self_attn.q_norm.weight"),
    _plain("decoder.layers.{L}.self_attention.k_layernorm.weight", f"{LM}.layers.{{L}}.self_attn.k_norm.weight"),
    _plain("decoder.layers.{L}.pre_mlp_layernorm.weight", f"{LM}.layers.{{L}}.post_attention_layernorm.weight"),
    _plain("decoder.layers.{L}.mlp.router.weight", f"{LM}.layers.{{L}}.mlp.gate.weight"),
    Rule("decoder.layers.{L}.mlp.experts.weight1", (f"{LM}.layers.{{L}}.mlp.experts.gate_up_proj",),
         _gate_up_in, _gate_up_out),
    Rule("decoder.layers.{L}.mlp.experts.weight2", (f"{LM}.layers.{{L}}.mlp.experts.down_proj",),
         _down_in, _down_out),
    # vision tower
    *_vit_linear("vision.patch_embed.proj", f"{VIT}.patch_embed.proj"),
    _plain("vision.pos_embed.weight", f"{VIT}.pos_embed.weight"),
    *_vit_linear("vision.decoder.layers.{B}.input_layernorm", f"{VIT}.blocks.{{B}}.norm1"),
    *(Rule(f"vision.decoder.layers.{{B}}.self_attention.linear_qkv.{p}", (f"{VIT}.blocks.{{B}}.attn.qkv.{p}",),
           _vit_qkv_in, _vit_qkv_out) for p in ("weight", "bias")),
    *_vit_linear("vision.decoder.layers.{B}.self_attention.linear_proj", f"{VIT}.blocks.{{B}}.attn.proj"),
    *_vit_linear("vision.decoder.layers.{B}.pre_mlp_layernorm", f"{VIT}.blocks.{{B}}.norm2"),
    *_vit_linear("vision.decoder.layers.{B}.mlp.linear_fc1", f"{VIT}.blocks.{{B}}.mlp.linear_fc1"),
    *_vit_linear("vision.decoder.layers.{B}.mlp.linear_fc2", f"{VIT}.blocks.{{B}}.mlp.linear_fc2"),
    *_merger("vision.merger", f"{VIT}.merger"),
    *_merger("vision.deepstack_mergers.{D}", f"{VIT}.deepstack_merger_list.{{D}}"),
)


def index_ranges(args: Qwen3VLMoeArgs) -> dict[str, int]:
    """How many values each placeholder takes."""
    return {"L": args.text.num_hidden_layers, "B": args.vision.depth, "D": len(args.vision.deepstack_visual_indexes)}


def expand(rule: Rule, args: Qwen3VLMoeArgs) -> list[tuple[str, tuple[str, ...]]]:
    """All (mcore name, hf names) instances of a rule."""
    for ph, n in index_ranges(args).items():
        if "{" + ph + "}" in rule.mcore:
            return [(rule.mcore.replace("{" + ph + "}", str(i)),
                     tuple(h.replace("{" + ph + "}", str(i)) for h in rule.hf)) for i in range(n)]
    return [(rule.mcore, rule.hf)]


def rules_for(args: Qwen3VLMoeArgs) -> list[tuple[Rule, str, tuple[str, ...]]]:
    """Every (rule, mcore name, hf names) of this architecture; the LM head is absent when embeddings are tied."""
    out = []
    for rule in RULES:
        if rule.mcore == "output_layer.weight" and args.tie_word_embeddings:
            continue
        out.extend((rule, m, h) for m, h in expand(rule, args))
    return out
