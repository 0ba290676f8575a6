"""Building blocks of the local (non-Transformer-Engine) layer spec: norms, the MoE layer, its router and grouped
experts (core attention is in attention.py, the EP=1 token dispatcher in dispatch.py). They run on the CPU and on
the GPU; the math follows transformers' Qwen3-VL MoE exactly.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection, router_gating_linear
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from qwenvl_mcore.models.qwen3_vl_moe.config import moe_dispatcher
from qwenvl_mcore.models.qwen3_vl_moe.dispatch import LocalTokenDispatcher
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


class Qwen3VLRouter(TopKRouter):
    """Megatron's top-k router in fp32, recording what transformers' load-balancing loss needs.

    With `moe_router_pre_softmax=False` megatron takes top-k of the logits and softmaxes over the k, which equals
    transformers' softmax over all experts, top-k, renormalised (norm_topk_prob). While `routing_record` is set
    (training), the layer's assignments, summed probabilities and valid-token count go into it, and the aux-loss
    gradient is attached to the probabilities (see routing.py). The gate stays on the input's device (megatron's
    `gating` moves it to CUDA).

    Padding tokens (`padding_mask` True) get probability 0, so their MoE output is 0; with the local (EP=1) and the
    allgather dispatchers they are also routed nowhere, so the expert counts leave them out (megatron's alltoall
    dispatcher needs k experts per token: `padding_routed`, set by Qwen3VLMoELayer). megatron-core 0.19 uses
    `padding_mask` only for its own aux/z losses and expert-bias counts; its top-k routing map and dispatchers
    still send padding to experts.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing_record = None  # routing.MicroBatchRouting of the micro-batch being run, set by the block
        # whether padding keeps its k experts in the routing map (megatron's alltoall dispatcher); the MoE layer
        # sets it once it has chosen its dispatcher
        self.padding_routed = self.config.moe_token_dispatcher_type == "alltoall"
        self._plain: bool | None = None  # whether `_plain_topk` stands for megatron's routing (plain_topk_reason)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        return router_gating_linear(input, self.weight, self.bias, torch.float32)

    def plain_topk_reason(self) -> str | None:
        """Why this router runs megatron's own routing rather than `_plain_topk` (None: it runs `_plain_topk`).

        `_plain_topk` is megatron's routing for exactly Qwen3-VL's settings: softmax over the top-k logits, no
        jitter, z-loss, expert bias, grouping, scaling, token dropping, replay or megatron aux loss (this router
        records its own). It runs the same ops, so its output is bit-identical (tests/unit/test_dispatch.py), without
        megatron's per-call checks and its compiled expert-bias hook, whose entry costs host time every layer even
        with no expert bias."""
        c = self.config
        checks = (
            (self.score_function == "softmax", f"score function {self.score_function!r}"),
            (not c.moe_router_pre_softmax, "moe_router_pre_softmax"),
            (self.routing_type not in ("sinkhorn", "quantile_balancing"), f"routing type {self.routing_type!r}"),
            (not self.is_aux_loss_enabled(), "megatron's aux loss"),
            (c.moe_z_loss_coeff is None, "moe_z_loss_coeff"),
            (c.moe_input_jitter_eps is None, "moe_input_jitter_eps"),
            (not self.enable_expert_bias, "expert bias"),
            (not c.moe_router_group_topk, "group-limited top-k"),
            (not c.moe_router_topk_scaling_factor, "moe_router_topk_scaling_factor"),
            (not c.moe_router_fusion, "moe_router_fusion"),
            (c.moe_expert_capacity_factor is None, "token dropping"),
            (not c.moe_router_force_load_balancing and c.moe_router_force_biased is None, "forced routing"),
            (getattr(self, "router_replay", None) is None, "router replay"),
        )
        for ok, name in checks:
            if not ok:
                return name
        return None

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if self._plain is None:
            self._plain = self.plain_topk_reason() is None
        if not self._plain:
            return super().forward(input, padding_mask=padding_mask)
        return self.routing(self.gating(input), padding_mask=padding_mask)

    def _plain_topk(self, logits: torch.Tensor):
        """megatron's `topk_routing_with_score_function` for softmax after top-k (its non-deterministic branch):
        probabilities [T, E] zero outside each token's top k, and the routing map [T, E]."""
        logits = logits.view(-1, self.config.num_moe_experts)
        scores, top = torch.topk(logits, k=self.topk, dim=1, sorted=torch.is_grad_enabled())
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
        routing_probs = torch.zeros_like(logits).scatter(1, top, probs)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
        return routing_probs, routing_map

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if self._plain and not torch.are_deterministic_algorithms_enabled():
            probs, routing_map = self._plain_topk(logits)
        else:  # megatron's deterministic mode builds the same tensors with index_put_
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if padding_mask is not None:
            # Masking only touches padding rows, so real tokens' probabilities and choices are unchanged (and an
            # all-False mask changes nothing). Done after megatron's routing so its top-k path stays as it is.
            pad = padding_mask.reshape(-1, 1).bool()
            probs = probs.masked_fill(pad, 0.0)
            if not self.padding_routed:
                # megatron's dropless alltoall dispatcher sizes its buffers as tokens x top-k, so there padding
                # keeps its k experts and contributes 0 through its zero probabilities (computed, never used).
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


# torch's grouped GEMM: public as F.grouped_mm from torch 2.9 on, torch._grouped_mm before.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def use_grouped_mm(x: torch.Tensor) -> bool:
    """Whether the experts run as one grouped GEMM by default: on CUDA in bf16, where torch's `grouped_mm` is its
    fast kernel. On the CPU a loop over experts is as fast, and CI checks the two against each other."""
    return x.is_cuda and x.dtype == torch.bfloat16 and _GROUPED_MM is not None


class ExpertGroups:
    """The rows of one experts call, sorted by expert: counts[e] rows for expert e, then any rows past sum(counts),
    which also go to the last expert (the local dispatcher puts the pairs it routes nowhere there, with probability
    0, so that every shape stays T x top-k: see dispatch.py).

    `counts` is a tensor (on the device from the local dispatcher, on the host from megatron's) or a list. The
    grouped GEMM's offsets are made on the rows' device without a host read, the loop's sizes with one read; each
    once per experts call, whichever projections and adapters use them.
    """

    def __init__(self, counts, rows: int):
        self.counts, self.rows = counts, rows
        self._offsets: torch.Tensor | None = None
        self._sizes: list[int] | None = None

    def offsets(self, device) -> torch.Tensor:
        """int32 end of each expert's rows on `device`, the last one = all rows."""
        if self._offsets is None:
            counts = torch.as_tensor(self.counts).to(device=device, dtype=torch.int32)
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            if offs.numel():
                offs[-1:].fill_(self.rows)
            self._offsets = offs
        return self._offsets

    def sizes(self) -> list[int]:
        """Rows per expert on the host, the last expert's including the rows past sum(counts)."""
        if self._sizes is None:
            sizes = self.counts.tolist() if torch.is_tensor(self.counts) else [int(c) for c in self.counts]
            extra = self.rows - sum(sizes)
            if extra < 0 or (extra and not sizes):
                raise ValueError(f"expert counts {sizes} do not fit {self.rows} rows sorted by expert")
            if extra:
                sizes[-1] += extra
            self._sizes = sizes
        return self._sizes


def expert_matmul(x: torch.Tensor, w: torch.Tensor, counts, *, grouped: bool) -> torch.Tensor:
    """x [T, k] with rows sorted by expert (counts[e] rows for expert e, rows past sum(counts) for the last
    expert: see ExpertGroups), w [E, k, n] -> [T, n]. `counts`: an ExpertGroups, a tensor or a list.

    grouped=True: one `torch.nn.functional.grouped_mm` call (offsets int32 on x's device, made there);
    grouped=False: one matmul per expert. Both give the same values and gradients (tests/unit/test_experts.py).
    """
    groups = counts if isinstance(counts, ExpertGroups) else ExpertGroups(counts, x.shape[0])
    if grouped:
        return _GROUPED_MM(x, w, offs=groups.offsets(x.device))
    # unbind, not w[e]: indexing's backward would allocate a zero tensor the size of all of w for every expert
    outs = [chunk @ w_e for chunk, w_e in zip(torch.split(x, groups.sizes()), w.unbind(0))]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


class GroupedExperts(MegatronModule):
    """All local experts' SwiGLU MLPs as stacked weights: one grouped GEMM per projection where that is fast (CUDA,
    bf16: `torch.nn.functional.grouped_mm`), a loop over experts elsewhere (see `expert_matmul`).

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
        self.grouped_gemm: bool | None = None  # None: grouped GEMM where fast (see use_grouped_mm), else the loop

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        # offsets (grouped GEMM) or host sizes (loop) made once for both projections and any adapters
        counts = ExpertGroups(tokens_per_expert, hidden.shape[0])
        grouped = use_grouped_mm(hidden) if self.grouped_gemm is None else self.grouped_gemm
        gate_up = self.project_gate_up(hidden, counts, grouped)
        gate, up = gate_up.view(-1, 2, self.ffn_local).unbind(1)
        inter = self.activation(gate) * up
        out = self.project_down(inter, counts, grouped)
        # transformers scales each expert's output by its routing weight after the down projection.
        out = out * probs.unsqueeze(-1).to(out.dtype)
        return out, None

    # The two projections, separate so that qwenvl_mcore.lora can add its per-expert adapters to them; `counts` is
    # the call's ExpertGroups.
    def project_gate_up(self, hidden: torch.Tensor, counts, grouped: bool) -> torch.Tensor:
        """[T, hidden] rows sorted by expert -> [T, 2 * F_l] (gate half, then up half)."""
        e_l, h = self.num_local_experts, self.config.hidden_size
        return expert_matmul(hidden, self.weight1.view(e_l, h, 2 * self.ffn_local), counts, grouped=grouped)

    def project_down(self, inter: torch.Tensor, counts, grouped: bool) -> torch.Tensor:
        """[T, F_l] -> [T, hidden] (partial over expert-TP ranks; the dispatcher sums them)."""
        return expert_matmul(inter, self.weight2, counts, grouped=grouped)

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


class Qwen3VLMoELayer(MoELayer):
    """megatron's MoELayer with the token dispatcher `config.moe_dispatcher` picks: dispatch.LocalTokenDispatcher
    where the layer's experts all live on its rank (EP = expert-TP = 1), megatron's configured one elsewhere. The
    router learns whether padding must keep its k experts (only megatron's alltoall dispatcher needs that)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, is_mtp_layer=False,
                 name=None):
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name)
        if moe_dispatcher(config, pg_collection.ep.size(), pg_collection.expt_tp.size()) == "local":
            self.token_dispatcher = LocalTokenDispatcher(self.num_local_experts, self.local_expert_indices,
                                                         config=config, pg_collection=pg_collection)
        self.router.padding_routed = isinstance(self.token_dispatcher, MoEAlltoAllTokenDispatcher)
