"""The ViT blocks and patch mergers on plain torch ops, for tensor parallelism 1.

megatron's module stack (`TransformerBlock` -> `TransformerLayer` -> Column/RowParallelLinear) runs every linear
through a Python `autograd.Function` and, in `RowParallelLinear`, looks the TP group up again on every call
(`get_rank()` and a warning each time). The ViT is dozens of small layers per micro-batch, so that host work is most
of its time on a GPU. At TP=1 none of it does anything: the linears' collectives are identities. The functions here
run the same computation with `F.layer_norm` / `F.linear` / the activation / the project's own core attention
module (`SDPAttention`, called as the layer's `self_attention.core_attention`, so varlen flash attention, selective
recompute and the rotary tables are exactly the megatron path's), directly on the megatron modules' parameters:
the parameter objects, names, state dicts, checkpoints and DDP's gradient hooks are untouched, and gradients
reach `param.grad` (DDP: `main_grad`) as before.

Two variants (`VisionModel.block_impl`):
- "torch" (the default at TP=1): each linear is one `F.linear(x, weight, bias)` (`addmm`, the bias fused into
  the GEMM as in transformers' `nn.Linear`); the residual is added after it. Equal to megatron's path to float
  rounding (the bias is added inside the GEMM instead of after it).
- "torch_exact": megatron's op order replayed exactly: `F.linear(x, weight)`, then the bias (megatron adds it in
  the linear for qkv and the mergers, in the activation / bias-dropout-add for proj, fc1 and fc2), bias and
  dropout before the residual. Bit-identical to megatron's path in outputs and every gradient.

LoRA adapters on the ViT linears (`qwenvl_mcore/lora`, `vit_*` and `merger_*` targets) are honoured: an adapted
linear adds `module.lora_delta(x)` where megatron's LoRA classes add it (after the bias for qkv and the mergers,
before it for proj, fc1 and fc2), in megatron's op order in both variants (the adapter's sum is a separate add
anyway), so an adapted linear is bit-identical to megatron's in "torch" too.

Activation recompute follows the ViT's config as megatron's block would: "full" checkpoints groups of
`recompute_num_layers` layers ("uniform") or the first `recompute_num_layers` layers one by one ("block"),
in training only; "selective" recomputes the core attention (done by `SDPAttention` itself). What this path does
not implement (sequence parallelism, fp8, fp32 residuals, other selective-recompute modules, fused bias
activation, CUDA graphs, TP>1) makes `plain_path_problem` name it, and the caller keeps megatron's stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["BLOCK_IMPLS", "plain_path_problem", "plain_blocks_forward", "plain_merger_forward"]

# "auto": "torch" where `plain_path_problem` finds nothing, else "megatron".
BLOCK_IMPLS = ("auto", "torch", "torch_exact", "megatron")


def plain_path_problem(config, layers=()) -> str | None:
    """Why the plain-torch path cannot stand in for megatron's stack for this ViT config (and these layers), or
    None when it can."""
    from qwenvl_mcore.models.qwen3_vl_moe.attention import SDPAttention
    from qwenvl_mcore.models.qwen3_vl_moe.layers import Norm

    if config.tensor_model_parallel_size != 1:
        return f"tensor parallelism {config.tensor_model_parallel_size} (the plain path is for TP=1)"
    checks = {
        "sequence_parallel": config.sequence_parallel,
        "fp8/fp4": bool(config.fp8 or config.fp4),
        "fp32_residual_connection": config.fp32_residual_connection,
        "gated_linear_unit": config.gated_linear_unit,
        "no linear bias": not config.add_bias_linear,
        "bias_activation_fusion": config.bias_activation_fusion,
        "use_te_activation_func": getattr(config, "use_te_activation_func", False),
        "attention_output_gate": getattr(config, "attention_output_gate", False),
        "qk_layernorm": config.qk_layernorm or getattr(config, "qk_l2_norm", False),
        "mlp_chunks_for_training": (getattr(config, "mlp_chunks_for_training", 1) or 1) > 1,
        "cpu_offloading": config.cpu_offloading,
        "cuda graphs": getattr(config, "cuda_graph_impl", "none") not in (None, "none"),
    }
    bad = [name for name, on in checks.items() if on]
    if bad:
        return "config sets " + ", ".join(bad)
    if config.recompute_granularity == "full" and config.recompute_method not in ("uniform", "block"):
        return f"recompute_method={config.recompute_method!r}"
    for i, layer in enumerate(layers):
        if layer.recompute_input_layernorm or layer.recompute_pre_mlp_layernorm or layer.recompute_mlp:
            return f"layer {i}: selective recompute of layernorm / mlp (only core_attn is done here)"
        if not isinstance(layer.self_attention.core_attention, SDPAttention):
            return f"layer {i}: core attention {type(layer.self_attention.core_attention).__name__}"
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            if not isinstance(norm, Norm) or norm.rms:
                return f"layer {i}: norm {type(norm).__name__} (the ViT's LayerNorm expected)"
    return None


def _lora(module) -> bool:
    adapters = getattr(module, "lora_A", None)
    return adapters is not None and len(adapters) > 0


def _linear(x: torch.Tensor, module, exact: bool) -> torch.Tensor:
    """A Column/RowParallelLinear (or its LoRA version) at TP=1 on a 2-D input, bias included, in megatron's op
    order when `exact` or when the linear has adapters (their sum is a separate add anyway), else with the bias
    inside the GEMM (see the module docstring)."""
    bias = module.bias
    delta = _lora(module)
    if not exact and not delta:
        return F.linear(x, module.weight, bias)
    y = F.linear(x, module.weight)
    if module.skip_bias_add:  # megatron: LoRA adds to the bias-less output; the caller's next op adds the bias
        if delta:
            y = y + module.lora_delta(x).to(y.dtype)
        return y if bias is None else y + bias
    if bias is not None:
        y = y + bias
    return y + module.lora_delta(x).to(y.dtype) if delta else y


def _layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return F.layer_norm(x, (norm.hidden_size,), norm.weight, norm.bias, norm.eps)


def _residual(residual: torch.Tensor, y: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """megatron's bias-dropout-add after the bias: dropout (none at p=0), then residual + y."""
    if p > 0:
        y = F.dropout(y, p=p, training=training)
    return residual + y


def _layer_forward(layer, x: torch.Tensor, attention, exact: bool) -> torch.Tensor:
    """One megatron `TransformerLayer` of the ViT spec on [s, hidden] (batch 1 folded away)."""
    s = x.shape[0]
    attn = layer.self_attention
    training = layer.training
    heads, groups = attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition
    hn = attn.hidden_size_per_attention_head
    per_group = heads // groups

    qkv = _linear(_layer_norm(x, layer.input_layernorm), attn.linear_qkv, exact)
    qkv = qkv.view(s, 1, groups, (per_group + 2) * hn)  # megatron's per-group [q..; k; v] rows
    q, k, v = torch.split(qkv, [per_group * hn, hn, hn], dim=3)
    q = q.reshape(s, 1, heads, hn)
    context = attn.core_attention(q, k, v, attention, attn_mask_type=attn.attn_mask_type)
    x = _residual(x, _linear(context.view(s, -1), attn.linear_proj, exact), layer.hidden_dropout, training)

    mlp = layer.mlp
    h = _linear(_layer_norm(x, layer.pre_mlp_layernorm), mlp.linear_fc1, exact)
    h = _linear(mlp.activation_func(h), mlp.linear_fc2, exact)
    return _residual(x, h, layer.hidden_dropout, training)


def plain_blocks_forward(block, hidden: torch.Tensor, attention, taps, *, exact: bool = False):
    """megatron `TransformerBlock.forward(hidden [s, 1, h], attention_mask=attention, extract_layer_indices=taps)`
    on plain ops: (output [s, h], [output of each layer in sorted(taps)], each [s, h])."""
    config = block.config
    layers = list(block.layers)
    taps = set(taps)
    x = hidden.reshape(hidden.shape[0], hidden.shape[-1])
    recompute = config.recompute_granularity == "full" and block.training and torch.is_grad_enabled()
    if not recompute:
        out = []
        for i, layer in enumerate(layers):
            x = _layer_forward(layer, x, attention, exact)
            if i in taps:
                out.append(x)
        return x, out

    def run(start: int, end: int):
        def fn(x):
            kept = []
            for i in range(start, end):
                x = _layer_forward(layers[i], x, attention, exact)
                if i in taps and i != end - 1:
                    kept.append(x)
            return (x, *kept)
        return fn

    n, out = config.recompute_num_layers, []
    if config.recompute_method == "uniform":
        spans = [(i, min(i + n, len(layers)), True) for i in range(0, len(layers), n)]
    else:  # "block": the first n layers checkpointed one by one, the rest not
        spans = [(i, i + 1, i < n) for i in range(len(layers))]
    for start, end, ckpt in spans:
        fn = run(start, end)
        x, *kept = checkpoint(fn, x, use_reentrant=False) if ckpt else fn(x)
        out.extend(kept)
        if end - 1 in taps:
            out.append(x)
    return x, out


def plain_merger_forward(merger, x: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    """`PatchMerger.forward` on plain ops at TP=1: [N, hidden] -> [N/4, out_hidden]."""
    x = x.reshape(-1, merger.hidden_size)
    if merger.postshuffle_norm:
        x = _layer_norm(x.reshape(-1, merger.merged_size), merger.norm)
    else:
        x = _layer_norm(x, merger.norm).reshape(-1, merger.merged_size)
    x = F.gelu(_linear(x, merger.linear_fc1, exact))  # exact (erf) GELU, as the megatron path
    return _linear(x, merger.linear_fc2, exact)
