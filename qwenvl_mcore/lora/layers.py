"""LoRA versions of the model's linears: megatron's Column/RowParallelLinear, the grouped experts and the router.

Each class subclasses the module it adapts and is installed by swapping the instance's class (`enable_lora`), so the
base parameters keep their names (`...linear_qkv.weight`: checkpoints, the HF mapping and the conversion engine see
the model unchanged) and the adapters appear next to them as `lora_A.<target>` / `lora_B.<target>`
(`torch.nn.ParameterDict`s keyed by target kind). The output is base(x) + scale * B(A(dropout(x))).

Sharding follows the base linear (the tensor-parallel layout is spelled out per class below); every adapter's
gradient is exact at any TP/SP/EP/ETP with megatron's own gradient reductions:
- a replicated tensor that sees only this rank's tokens (sequence parallelism) is marked `sequence_parallel`, which
  megatron's finalize_model_grads sums over TP (as it does for norm weights);
- a replicated expert tensor that sees only this rank's expert-TP slice has its gradient all-reduced over the
  expert-TP group in backward (`_SumGradOver`), since megatron reduces expert gradients over expert-DP only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from qwenvl_mcore.models.qwen3_vl_moe.layers import GroupedExperts, Qwen3VLRouter, expert_matmul


class _SumGradOver(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over `group` (a replicated tensor whose gradient each
    rank of the group computes only a part of)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _mark(p: torch.nn.Parameter, *, tp_dim: int | None = None, sequence_parallel: bool = False,
          expert: bool = False) -> torch.nn.Parameter:
    """megatron's sharding attributes: `tp_dim` split over (expert-)TP, `sequence_parallel` for finalize's TP sum,
    `allreduce=False` for expert tensors (reduced over expert-DP, like the experts' own weights)."""
    setattr(p, "tensor_model_parallel", tp_dim is not None)
    setattr(p, "partition_dim", -1 if tp_dim is None else tp_dim)
    setattr(p, "partition_stride", 1)
    if sequence_parallel:
        setattr(p, "sequence_parallel", True)
    if expert:
        setattr(p, "allreduce", False)
    setattr(p, "lora", True)
    return p


def _new(shape, like: torch.Tensor) -> torch.nn.Parameter:
    # Zeros: `apply_lora` draws the values per global tensor (layout-independent), or a loader sets them.
    return torch.nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))


class _Adapters:
    """Shared state of every LoRA class: the ParameterDicts, scale, rank and dropout."""

    # No instance layout of its own, and listed after the adapted class: the LoRA class then has the same layout
    # as the adapted one (Python adds a __dict__ slot when a slot-less mixin comes first), so `enable_lora` can
    # swap an instance's class.
    __slots__ = ()

    def _init_adapters(self, *, rank: int, scale: float, dropout: float) -> None:
        self.lora_A = torch.nn.ParameterDict()
        self.lora_B = torch.nn.ParameterDict()
        self.lora_rank, self.lora_scale, self.lora_dropout = rank, scale, dropout

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout > 0 else x

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(self.lora_A.keys())


class LoRAColumnParallelLinear(ColumnParallelLinear, _Adapters):
    """ColumnParallelLinear + adapters. A [r, in] whole on every TP rank, B [out/tp, r] split like the weight's rows.

    Under sequence parallelism the input is this rank's token slice: z = x A^T is computed on it and all-gathered
    over the sequence ([s, b, r], small), so A only sees local tokens and is marked `sequence_parallel`. Without
    sequence parallelism (the ViT) the input is replicated and dz is all-reduced over TP, so A's gradient is whole.

    Several targets may share one fused linear (the LLM's q, k, v in `linear_qkv`): each has its own A and B, the A's
    run as one GEMM, and the B outputs are interleaved per KV group into megatron's [q_g; k_g; v_g] row layout
    (`qkv_groups`), i.e. exactly peft's separate q_proj / k_proj / v_proj adapters.
    """

    qkv_groups: tuple[int, dict[str, int]] | None = None  # (local KV groups, rows per group of each of q/k/v)

    def add_adapter(self, target: str, out_rows: int) -> None:
        """Adapter `target` writing `out_rows` local output rows (the whole output unless the linear is fused)."""
        in_size = self.weight.shape[1]
        self.lora_A[target] = _mark(_new((self.lora_rank, in_size), self.weight),
                                    sequence_parallel=self.sequence_parallel)
        self.lora_B[target] = _mark(_new((out_rows, self.lora_rank), self.weight), tp_dim=0)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        names = self.lora_targets
        a = self.lora_A[names[0]] if len(names) == 1 else torch.cat([self.lora_A[n] for n in names])
        z = F.linear(self._dropout(x), a) * self.lora_scale
        if self.sequence_parallel:
            z = gather_from_sequence_parallel_region(z, tensor_parallel_output_grad=True, group=self.tp_group)
        elif self.tp_group.size() > 1:
            z = copy_to_tensor_model_parallel_region(z, group=self.tp_group)
        zs = z.split(self.lora_rank, dim=-1)
        if self.qkv_groups is None:
            return F.linear(zs[0], self.lora_B[names[0]])
        groups, rows = self.qkv_groups
        parts = []
        for part in ("q", "k", "v"):
            if part in names:
                y = F.linear(zs[names.index(part)], self.lora_B[part])
            else:  # an untargeted part of the fused linear gets no update
                y = z.new_zeros(*z.shape[:-1], groups * rows[part])
            parts.append(y.view(*z.shape[:-1], groups, rows[part]))
        return torch.cat(parts, dim=-1).flatten(-2)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's (weight and bias split on dim 0), plus B split on dim 0 and A replicated. (megatron's own
        would store every B shard as if it were the whole tensor.)"""
        axes = {"weight": 0, "bias": 0, **{f"lora_B.{k}": 0 for k in self.lora_B}}
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, axes,
                                                   sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is not None or self.gather_output or runtime_gather_output:
            raise NotImplementedError("LoRA on a ColumnParallelLinear with a shared weight or gathered output")
        out, bias = super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        return out + self.lora_delta(input_).to(out.dtype), bias


class LoRARowParallelLinear(RowParallelLinear, _Adapters):
    """RowParallelLinear + adapter. A [r, in/tp] split like the weight's columns, B [out, r] whole.

    z = x_local A_local^T is a partial sum over TP ranks ([s, b, r], small): reduced like the base output (all-reduce,
    or reduce-scatter over the sequence under sequence parallelism), then B applied. Under sequence parallelism B
    sees only this rank's tokens and is marked `sequence_parallel`."""

    def add_adapter(self, target: str) -> None:
        if not self.input_is_parallel:
            raise NotImplementedError("LoRA on a RowParallelLinear whose input is not already split")
        out_size, in_local = self.weight.shape
        self.lora_A[target] = _mark(_new((self.lora_rank, in_local), self.weight), tp_dim=1)
        self.lora_B[target] = _mark(_new((out_size, self.lora_rank), self.weight),
                                    sequence_parallel=self.sequence_parallel)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        (name,) = self.lora_targets
        z = F.linear(self._dropout(x), self.lora_A[name]) * self.lora_scale
        if self.sequence_parallel:
            z = reduce_scatter_to_sequence_parallel_region(z, group=self.tp_group)
        elif self.tp_group.size() > 1:
            z = reduce_from_tensor_model_parallel_region(z, group=self.tp_group)
        return F.linear(z, self.lora_B[name])

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's (weight split on dim 1, bias replicated), plus A split on dim 1 and B replicated."""
        axes = {"weight": 1, **{f"lora_A.{k}": 1 for k in self.lora_A}}
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, axes,
                                                   sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])

    def forward(self, input_):
        out, bias = super().forward(input_)
        return out + self.lora_delta(input_).to(out.dtype), bias


class LoRAGroupedExperts(GroupedExperts, _Adapters):
    """GroupedExperts + one adapter per local expert on each fused tensor, computed with the experts' own grouped
    GEMM path (`expert_matmul`: two more grouped GEMMs per adapted projection, no per-expert Python loop).

    Local shapes (E_l experts, F_l = F / etp), laid out like weight1 / weight2 so an expert's adapters live with it:
      lora_A.experts_gate_up [E_l, hidden, r] (whole over expert-TP), lora_B.experts_gate_up [E_l, r, 2, F_l]
      lora_A.experts_down    [E_l, F_l, r],                            lora_B.experts_down    [E_l, r, hidden] (whole)
    Dim 0 is split over EP like the weights; the F dim over expert-TP. The two tensors that are whole over expert-TP
    only see that rank's F slice, so their gradients are summed over the expert-TP group in backward.
    """

    def add_adapter(self, target: str) -> None:
        e, h, f, r = self.num_local_experts, self.config.hidden_size, self.ffn_local, self.lora_rank
        if target == "experts_gate_up":
            self.lora_A[target] = _mark(_new((e, h, r), self.weight1), expert=True)
            self.lora_B[target] = _mark(_new((e, r, 2, f), self.weight1), tp_dim=3, expert=True)
        elif target == "experts_down":
            self.lora_A[target] = _mark(_new((e, f, r), self.weight2), tp_dim=1, expert=True)
            self.lora_B[target] = _mark(_new((e, r, h), self.weight2), expert=True)
        else:
            raise ValueError(f"no expert adapter {target!r}")
        if self.etp_group.size() == 1:  # the F dim is not split: mark nothing as split
            for p in (self.lora_A[target], self.lora_B[target]):
                setattr(p, "tensor_model_parallel", False)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The experts' weights (see GroupedExperts) plus the adapters: dim 0 over EP, the F dim over expert-TP
        where split, replicated over expert-TP where whole."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        ep_rank, ep = self.ep_group.rank(), self.ep_group.size()
        etp_rank, etp = self.etp_group.rank(), self.etp_group.size()
        prepend = len(sharded_offsets)
        for ab, params in (("A", self.lora_A), ("B", self.lora_B)):
            for kind, p in params.items():
                key = f"{prefix}lora_{ab}.{kind}"
                offsets = [*sharded_offsets, (prepend, ep_rank, ep)]
                split = etp > 1 and p.tensor_model_parallel
                if split:
                    offsets.append((prepend + p.partition_dim, etp_rank, etp))
                out[key] = ShardedTensor.from_rank_offsets(
                    key, p, *offsets, prepend_axis_num=prepend,
                    replica_id=(0, 0 if split else etp_rank, self.edp_group.rank()))
        return out

    def _lora_grouped(self, grouped: bool, dtype: torch.dtype) -> bool:
        # torch's grouped_mm needs 16-byte aligned strides: rank 4 (fp32) / 8 (bf16) and multiples. Other ranks
        # take the per-expert loop for the adapters only (the base projections keep the grouped GEMM).
        return grouped and (self.lora_rank * torch.finfo(dtype).bits // 8) % 16 == 0

    def _whole(self, p: torch.Tensor) -> torch.Tensor:
        return _SumGradOver.apply(p, self.etp_group) if self.etp_group.size() > 1 else p

    def project_gate_up(self, hidden, counts, grouped):
        out = super().project_gate_up(hidden, counts, grouped)
        if "experts_gate_up" not in self.lora_A:
            return out
        a, b = self._whole(self.lora_A["experts_gate_up"]), self.lora_B["experts_gate_up"]
        grouped = self._lora_grouped(grouped, a.dtype)
        z = expert_matmul(hidden, a, counts, grouped=grouped) * self.lora_scale
        return out + expert_matmul(z, b.view(b.shape[0], b.shape[1], -1), counts, grouped=grouped)

    def project_down(self, inter, counts, grouped):
        out = super().project_down(inter, counts, grouped)
        if "experts_down" not in self.lora_A:
            return out
        a, b = self.lora_A["experts_down"], self._whole(self.lora_B["experts_down"])
        grouped = self._lora_grouped(grouped, a.dtype)
        z = expert_matmul(inter, a, counts, grouped=grouped) * self.lora_scale
        return out + expert_matmul(z, b, counts, grouped=grouped)


class LoRARouter(Qwen3VLRouter, _Adapters):
    """The router + adapter, in fp32 like the router's own logits: A [r, hidden], B [num_experts, r], both whole
    and, under sequence parallelism, marked `sequence_parallel` (the router sees this rank's tokens)."""

    def add_adapter(self, target: str) -> None:
        sp = self.config.sequence_parallel
        self.lora_A[target] = _mark(_new((self.lora_rank, self.weight.shape[1]), self.weight), sequence_parallel=sp)
        self.lora_B[target] = _mark(_new((self.weight.shape[0], self.lora_rank), self.weight), sequence_parallel=sp)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().gating(input)
        (name,) = self.lora_targets
        z = F.linear(input.to(torch.float32), self.lora_A[name].to(torch.float32)) * self.lora_scale
        return logits + F.linear(z, self.lora_B[name].to(torch.float32)).view_as(logits)


_LORA_CLASS = {
    ColumnParallelLinear: LoRAColumnParallelLinear,
    RowParallelLinear: LoRARowParallelLinear,
    GroupedExperts: LoRAGroupedExperts,
    Qwen3VLRouter: LoRARouter,
}


def enable_lora(module: torch.nn.Module, *, rank: int, scale: float, dropout: float) -> torch.nn.Module:
    """Turn `module` (exactly one of the adapted classes, or already a LoRA one) into its LoRA class in place; its
    parameters and their names are unchanged. Returns it (call `add_adapter` next)."""
    if isinstance(module, _Adapters):
        return module
    cls = _LORA_CLASS.get(type(module))
    if cls is None:
        raise TypeError(f"LoRA cannot adapt a {type(module).__name__} (adapts {[c.__name__ for c in _LORA_CLASS]})")
    module.__class__ = cls
    module._init_adapters(rank=rank, scale=scale, dropout=dropout)
    return module
