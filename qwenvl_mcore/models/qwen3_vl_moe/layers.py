"""Building blocks of the local (non-Transformer-Engine) layer spec: norms, SDPA core attention, the router and
the grouped experts. They run on the CPU and on the GPU; the math follows transformers' Qwen3-VL MoE exactly.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.moe_utils import router_gating_linear

from qwenvl_mcore.models.qwen3_vl_moe.routing import AuxLossGradient


class Norm(torch.nn.Module):
    """RMSNorm or LayerNorm (config.normalization), computed like transformers (RMSNorm in fp32, then weight).

    Megatron builder contract: Norm(config=..., hidden_size=..., eps=...). The weight is marked
    `sequence_parallel` when the config is, so megatron's finalize_model_grads sums its gradient over the TP group
    (under sequence parallelism each TP rank sees a different slice of tokens; for q/k norms, different heads).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            if p is not None:
                setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SDPAttention(MegatronModule):
    """Core attention on torch's scaled_dot_product_attention (flash/efficient kernels on the GPU, math on the CPU).

    Inputs follow megatron's core-attention contract: q [sq, b, np, hn], k/v [sk, b, ng, hn] (GQA groups are
    expanded by SDPA), returns [sq, b, np*hn]. `attention_mask` is None (causal for causal layers, full
    otherwise) or a bool tensor broadcastable to [b, np, sq, sk] where True means *masked out* (megatron's
    convention). Needs no CUDA RNG and no CUDA mask helper, so it also runs without a GPU.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **_unused):
        super().__init__(config=config)
        from megatron.core.transformer.enums import AttnMaskType

        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism.")
        self.causal = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = softmax_scale
        tp = config.tensor_model_parallel_size
        self.hidden_size_per_partition = config.kv_channels * config.num_attention_heads // tp

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if packed_seq_params is not None:
            raise ValueError("SDPAttention: packed (THD) sequences are passed as a block mask, not packed_seq_params.")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.softmax_scale,
                                                 enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale,
                                                 enable_gqa=True)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


class Qwen3VLRouter(TopKRouter):
    """Megatron's top-k router in fp32, recording what transformers' load-balancing loss needs.

    With `moe_router_pre_softmax=False` megatron takes top-k of the logits and softmaxes over the k, which equals
    transformers' softmax over all experts, top-k, renormalised (norm_topk_prob). While `routing_record` is set
    (training), the layer's assignments, summed probabilities and valid-token count go into it, and the aux-loss
    gradient is attached to the probabilities (see routing.py). The gate stays on the input's device (megatron's
    `gating` moves it to CUDA).

    Padding tokens (`padding_mask` True) are routed nowhere: no expert in the routing map, probability 0, so no
    dispatcher sends them and no expert computes them (their MoE output is 0). megatron-core 0.19 uses
    `padding_mask` only for its own aux/z losses and expert-bias counts; its top-k routing map and dispatchers
    still send padding to experts.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing_record = None  # routing.MicroBatchRouting of the micro-batch being run, set by the block

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        return router_gating_linear(input, self.weight, self.bias, torch.float32)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if padding_mask is not None:
            # Masking only touches padding rows, so real tokens' probabilities and choices are unchanged (and an
            # all-False mask changes nothing). Done after megatron's routing so its top-k path stays as it is.
            pad = padding_mask.reshape(-1, 1).bool()
            probs = probs.masked_fill(pad, 0.0)
            routing_map = routing_map & ~pad
        record = self.routing_record
        if record is None:
            return probs, routing_map
        scores = torch.softmax(logits.reshape(-1, self.num_experts).float(), dim=-1)
        assigned = routing_map.reshape(-1, self.num_experts)
        if padding_mask is not None:
            # megatron's padding_mask is True at padding tokens (its docstring says otherwise; its code, used here, agrees)
            valid = ~padding_mask.reshape(-1).bool()
        else:
            valid = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        weights = valid.to(scores.dtype).reshape(-1, 1)
        record.record(self.layer_number, (assigned & valid.reshape(-1, 1)).sum(0),
                      (scores * weights).sum(0), valid.sum())
        if record.coeff_scale > 0:
            probs = AuxLossGradient.apply(probs, scores, valid, record)
        return probs, routing_map


class GroupedExperts(MegatronModule):
    """All local experts' SwiGLU MLPs as stacked weights: one grouped GEMM per projection on the GPU
    (`torch.nn.functional.grouped_mm`), a loop over experts on the CPU (grouped_mm has no CPU backward).

    Weights (local shapes; E_l = experts on this EP rank, F_l = moe_intermediate / etp):
      weight1 [E_l, hidden, 2, F_l]: gate (index 0) and up (index 1) projections, x @ weight1[e].view(h, 2*F_l)
      weight2 [E_l, F_l, hidden]:    down projection
    Their global shapes [E, hidden, 2, F] and [E, F, hidden] are the released checkpoint's fused
    `gate_up_proj` [E, hidden, 2F] (viewed) and `down_proj` [E, F, hidden]; EP shards dim 0 and ETP the F dim,
    so a distributed checkpoint reshards across any EP/ETP layout with plain sharded tensors.
    """

    def __init__(self, num_local_experts: int, config, *, pg_collection=None, name=None, **_unused):
        super().__init__(config=config)
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        pg = pg_collection or get_default_pg_collection()
        self.ep_group, self.etp_group, self.edp_group = pg.ep, pg.expt_tp, pg.expt_dp
        self.num_local_experts = num_local_experts
        etp = self.etp_group.size()
        ffn = config.moe_ffn_hidden_size
        if ffn % etp:
            raise ValueError(f"moe_ffn_hidden_size {ffn} is not divisible by expert tensor parallel size {etp}")
        self.ffn_local = ffn // etp
        h = config.hidden_size
        dev = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = torch.nn.Parameter(
            torch.empty(num_local_experts, h, 2, self.ffn_local, dtype=config.params_dtype, device=dev))
        self.weight2 = torch.nn.Parameter(
            torch.empty(num_local_experts, self.ffn_local, h, dtype=config.params_dtype, device=dev))
        if config.perform_initialization:
            config.init_method(self.weight1)
            config.output_layer_init_method(self.weight2)
        for p, dim in ((self.weight1, 3), (self.weight2, 1)):
            # Expert weights are reduced over the expert-data-parallel group, not the full DP group.
            setattr(p, "allreduce", False)
            setattr(p, "tensor_model_parallel", etp > 1)
            setattr(p, "partition_dim", dim)
            setattr(p, "partition_stride", 1)
        self.activation = config.activation_func

    def _matmul(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [T, k] sorted by expert, w [E_l, k, n], counts [E_l] -> [T, n]."""
        if x.is_cuda and hasattr(F, "grouped_mm") and x.dtype == torch.bfloat16:
            offs = torch.cumsum(counts.to(device=x.device, dtype=torch.int32), 0, dtype=torch.int32)
            return F.grouped_mm(x, w, offs=offs)
        outs = []
        for e, chunk in enumerate(torch.split(x, counts.tolist())):
            outs.append(chunk @ w[e])
        return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        counts = tokens_per_expert if torch.is_tensor(tokens_per_expert) else torch.tensor(tokens_per_expert)
        counts = counts.to("cpu", torch.int64) if not hidden.is_cuda else counts
        e_l, h = self.num_local_experts, self.config.hidden_size
        gate_up = self._matmul(hidden, self.weight1.view(e_l, h, 2 * self.ffn_local), counts)
        gate, up = gate_up.view(-1, 2, self.ffn_local).unbind(1)
        inter = self.activation(gate) * up
        out = self._matmul(inter, self.weight2, counts)
        # transformers scales each expert's output by its routing weight after the down projection.
        out = out * probs.unsqueeze(-1).to(out.dtype)
        return out, None

    def backward_dw(self) -> None:  # megatron's delayed-wgrad hook; nothing is delayed here
        return None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Global tensors [E, h, 2, F] / [E, F, h] sharded over EP (dim 0) and ETP (F dim)."""
        ep_rank, ep = self.ep_group.rank(), self.ep_group.size()
        etp_rank, etp = self.etp_group.rank(), self.etp_group.size()
        prepend = len(sharded_offsets)
        out = {}
        for name, param, f_dim in (("weight1", self.weight1, 3), ("weight2", self.weight2, 1)):
            offsets = (*sharded_offsets, (prepend, ep_rank, ep), (prepend + f_dim, etp_rank, etp))
            out[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", param, *offsets, replica_id=(0, 0, self.edp_group.rank()), prepend_axis_num=prepend,
            )
        return out
