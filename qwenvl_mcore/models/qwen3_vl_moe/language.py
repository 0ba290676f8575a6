"""The MoE decoder: layer spec and a TransformerBlock that adds DeepStack visual features after layers 0..n-1."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, get_transformer_layer_offset
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.utils import make_viewless_tensor

from qwenvl_mcore.models.qwen3_vl_moe.attention import SDPAttention, SegmentSelfAttention
from qwenvl_mcore.models.qwen3_vl_moe.layers import GroupedExperts, Norm, Qwen3VLMoELayer, Qwen3VLRouter
from qwenvl_mcore.models.qwen3_vl_moe.visual_scatter import VisualScatter


def language_layer_spec() -> ModuleSpec:
    """Local spec of one decoder layer: RMSNorm, GQA self-attention with per-head q/k RMSNorm, MoE MLP.

    Runs everywhere (CPU included). Transformer Engine's fused layers are a later fast path; they change the
    parameter names (fused norms into linears), which the mapping table would then follow.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SegmentSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=Norm,
                    k_layernorm=Norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=partial(Qwen3VLMoELayer, submodules=MoESubmodules(experts=GroupedExperts, router=Qwen3VLRouter)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


@dataclass
class DeepStackInputs:
    """DeepStack features (one [n_visual, h] tensor per target layer) and where they go."""

    features: list[torch.Tensor]
    scatter: VisualScatter


class DeepStackTransformerBlock(TransformerBlock):
    """megatron's TransformerBlock whose forward adds DeepStack features after global layers 0..n-1.

    The loop is ours (megatron's block has no per-layer hook); everything else (layers, final norm, sharded
    state dict, PP offsets) is megatron's. Full activation recompute checkpoints each layer. `routing_record`
    (routing.MicroBatchRouting) receives the routers' statistics while training.
    """

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, padding_mask=None,
                deepstack: DeepStackInputs | None = None, routing_record=None, **unused):
        if not self.pre_process:
            hidden_states = self.input_tensor
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        pp_group = getattr(self.pg_collection, "pp", None)
        offset = get_transformer_layer_offset(self.config, self.vp_stage, pp_group.rank() if pp_group else 0)
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        recompute = self.config.recompute_granularity == "full" and self.training
        with rng:
            for local_index, layer in enumerate(self.layers):
                def run(h, layer=layer):
                    # set here, inside the (possibly recomputed) function, so a recompute during the backward of
                    # this micro-batch records into this micro-batch's statistics
                    layer.mlp.router.routing_record = routing_record
                    try:
                        return layer(hidden_states=h, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                     padding_mask=padding_mask)[0]
                    finally:
                        layer.mlp.router.routing_record = None

                if recompute:
                    hidden_states = tensor_parallel.checkpoint(run, False, hidden_states)
                else:
                    hidden_states = run(hidden_states)
                layer_index = local_index + offset
                if deepstack is not None and layer_index < len(deepstack.features):
                    hidden_states = deepstack.scatter.add(hidden_states, deepstack.features[layer_index])
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
            hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        if not self.pre_process and len(self.layers) == 0 and self.final_layernorm is None:
            hidden_states = hidden_states.clone()
        return hidden_states
