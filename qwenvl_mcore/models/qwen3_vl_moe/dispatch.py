"""The token dispatcher of MoE layers whose experts all live on this rank (expert-parallel and expert-tensor-parallel
size 1): fixed shapes, no host sync, no atomics.

megatron-core 0.19's dispatchers do more than this layout needs. Its alltoall dispatcher (the GPU's) blocks the host
once per layer forward to read the per-expert counts and copies the tokens through `sort_chunks_by_idxs`, a
permutation that is the identity when EP = TP = 1; its allgather dispatcher reads the counts with `.cpu()` and the
probabilities with `masked_select` (data-dependent sizes); both scatter-add in the combine and index-add in the
permute backward (atomics on the GPU, in the activations' dtype). Here, for T tokens routed to k experts each:

- every (token, slot) pair gets a key, its expert, or E (one past the last expert) for a slot that routes nowhere
  (padding, whose routing-map row is empty): the k smallest of where(routing map, expert id, E) per token; one
  stable sort of the T*k keys orders the pairs by expert and, within an expert, by token, which is megatron's
  permutation order (`moe_utils.permute`), with the unrouted pairs last;
- the permuted tokens are one gather of T*k rows; their backward is the transpose, a gather + sum over the k slots;
- the per-expert counts are `routing_map.sum(0)` (int32, fixed size E, on the device) and reach the grouped GEMM as
  device offsets (`layers.ExpertGroups`); the experts run the unrouted rows, which have probability 0, with the
  last expert (`layers.expert_matmul`), so their outputs and gradients are exact zeros: padding is computed (T*k
  rows whatever the padding) but contributes nothing, and the counts, like megatron's allgather dispatcher's,
  leave it out;
- the combine is a gather by the inverse permutation and a sum over the k slots in expert order (on the GPU the
  bf16 sum accumulates in fp32; megatron's scatter-add accumulates in bf16); its backward is one gather.

Every output has a size known from the input shapes, so nothing is read back to the host. In fp32 on the CPU the
permuted tokens, probabilities and counts equal megatron's allgather dispatcher's bit for bit, the outputs and
gradients to rounding (tests/unit/test_dispatch.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


@dataclass
class LanguageTransformerConfig(TransformerConfig):
    """megatron's TransformerConfig of the language model plus this project's MoE setting (config.py builds it)."""

    # MoE layers with expert-parallel and expert-tensor-parallel size 1 route their tokens with
    # LocalTokenDispatcher (no host sync, no atomics); every other layout keeps `moe_token_dispatcher_type`.
    # False: megatron's dispatcher everywhere.
    moe_local_dispatcher: bool = True


@dataclass
class RoutePlan:
    """Where the T*k (token, slot) pairs of one MoE layer forward go; every tensor lives on the routing map's device.

    experts [T, k]: each token's experts, ascending (slots of a token routed to fewer than k experts hold
        distinct unrouted experts, whose probability is 0);
    order [T*k]: the pairs (flat index token*k + slot) in expert order, unrouted pairs last;
    source [T*k]: the token of each permuted row (order // k);
    slots [T*k]: the inverse of `order`: where pair token*k + slot sits among the permuted rows;
    counts [E]: routed pairs per expert (int32, the grouped GEMM's offset type).
    """

    experts: torch.Tensor
    order: torch.Tensor
    source: torch.Tensor
    slots: torch.Tensor
    counts: torch.Tensor
    topk: int


def plan_routes(routing_map: torch.Tensor, topk: int, constants: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> RoutePlan:
    """The permutation of a [T, E] boolean routing map with at most `topk` experts per token (exactly `topk` for a
    routed token, none for padding), from fixed-size device ops only. `constants`: (arange(E), E) on the map's
    device (`expert_constants`; the dispatcher keeps them)."""
    expert_ids, sink = constants or expert_constants(routing_map.shape[1], routing_map.device)
    # per token, the k smallest of (its expert ids where routed, E elsewhere): its routed experts ascending, then E
    keys, experts = torch.topk(torch.where(routing_map, expert_ids, sink), topk, dim=1, largest=False)
    order = torch.argsort(keys.view(-1), stable=True)
    source = torch.div(order, topk, rounding_mode="floor")
    slots = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return RoutePlan(experts=experts, order=order, source=source, slots=slots,
                     counts=routing_map.sum(0, dtype=torch.int32), topk=topk)


def expert_constants(num_experts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """arange(E) and the sink key E (0-dim) on `device`, int64."""
    return (torch.arange(num_experts, device=device),
            torch.tensor(num_experts, dtype=torch.long, device=device))


class _GatherRows(torch.autograd.Function):
    """Forward: rows[source] ([T, h] -> [T*k, h]). Backward: the transpose, the gradient of each token summed over
    its k permuted rows (a gather by `slots` + a sum; no atomics)."""

    @staticmethod
    def forward(ctx, rows, source, slots, topk: int):
        ctx.save_for_backward(slots)
        ctx.topk = topk
        return rows.index_select(0, source)

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        return _sum_slots(grad, slots, ctx.topk), None, None, None


class _SumSlots(torch.autograd.Function):
    """Forward: each token's k permuted rows summed ([T*k, h] -> [T, h], a gather by `slots` + a sum over the slots,
    in the order of the token's experts). Backward: the transpose, a gather by `source`."""

    @staticmethod
    def forward(ctx, rows, slots, source, topk: int):
        ctx.save_for_backward(source)
        return _sum_slots(rows, slots, topk)

    @staticmethod
    def backward(ctx, grad):
        (source,) = ctx.saved_tensors
        return grad.index_select(0, source), None, None, None


def _sum_slots(rows: torch.Tensor, slots: torch.Tensor, topk: int) -> torch.Tensor:
    gathered = rows.index_select(0, slots)
    return gathered.view(slots.numel() // max(topk, 1), topk, rows.shape[-1]).sum(1)


class _PermuteProbs(torch.autograd.Function):
    """Forward: probs [T, E] -> the probability of each permuted row [T*k] (probs[token, expert] in `order`).
    Backward: the gradient gathered back by `slots` and written (no accumulation: a token's experts differ) into a
    zero [T, E]."""

    @staticmethod
    def forward(ctx, probs, experts, order, slots):
        ctx.save_for_backward(experts, slots)
        ctx.shape = probs.shape
        return probs.gather(1, experts).reshape(-1).index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        experts, slots = ctx.saved_tensors
        per_token = grad.index_select(0, slots).view(experts.shape)
        out = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device).scatter_(1, experts, per_token)
        return out, None, None, None


class LocalTokenDispatcher(MoETokenDispatcher):
    """megatron's MoETokenDispatcher interface for expert-parallel and expert-tensor-parallel size 1 (see the module
    docstring): no communication, fixed shapes, no host sync, gathers instead of scatter-adds in forward and
    backward. Any attention TP/SP/CP layout works: with expert-TP 1 every rank runs all experts on its own tokens,
    which is also what megatron's allgather dispatcher does there (its TP x EP group has size 1)."""

    def __init__(self, num_local_experts: int, local_expert_indices, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if self.ep_size != 1 or self.tp_size != 1:
            raise ValueError(
                f"LocalTokenDispatcher runs the layouts with expert-parallel and expert-tensor-parallel size 1; this "
                f"rank has ep={self.ep_size}, expert-tp={self.tp_size}: use megatron's dispatcher "
                "(moe_local_dispatcher=False).")
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.topk = config.moe_router_topk
        self.plan: RoutePlan | None = None
        self.hidden_shape = None
        self._constants: tuple[torch.Tensor, torch.Tensor] | None = None  # expert_constants on the tokens' device

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        if routing_map.dim() != 2:  # the router's is [tokens, E] already
            routing_map = routing_map.reshape(-1, routing_map.shape[-1])
        if self._constants is None or self._constants[0].device != routing_map.device:
            self._constants = expert_constants(routing_map.shape[-1], routing_map.device)
        self.plan = plan_routes(routing_map, self.topk, self._constants)
        return hidden_states.view(-1, self.hidden_shape[-1]), probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs  # every expert is local

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """-> tokens sorted by expert [T*k, h], routed pairs per expert [E] (device), their probabilities [T*k]."""
        plan = self.plan
        permuted = _GatherRows.apply(hidden_states, plan.source, plan.slots, plan.topk)
        if probs.dim() != 2:
            probs = probs.reshape(-1, probs.shape[-1])
        permuted_probs = _PermuteProbs.apply(probs, plan.experts, plan.order, plan.slots)
        return permuted, plan.counts, permuted_probs

    def combine_preprocess(self, hidden_states: torch.Tensor):
        plan, self.plan = self.plan, None
        return _SumSlots.apply(hidden_states, plan.slots, plan.source, plan.topk)

    def token_combine(self, hidden_states: torch.Tensor):
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor):
        return hidden_states.view(self.hidden_shape)
