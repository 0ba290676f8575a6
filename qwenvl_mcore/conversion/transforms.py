"""Small pure tensor transforms between transformers' and megatron's parameter layouts (both directions).

Each pair is exact (no arithmetic, only reshapes/permutations/concatenations), so round trips are bit-exact.
"""

from __future__ import annotations

import torch

RELEASED = "released"  # experts as in the released files: gate_up [E, hidden, 2F], down [E, F, hidden]
TRANSFORMERS5 = "transformers5"  # as transformers 5 keeps and saves them: gate_up [E, 2F, hidden], down [E, hidden, F]


class LayoutMismatch(ValueError):
    """A tensor whose shape fits neither known layout for the config."""


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int, num_groups: int,
                 head_dim: int) -> torch.Tensor:
    """Separate q [nh*d, ...], k/v [ng*d, ...] -> megatron's fused qkv, grouped per KV head:
    [ng, (nh/ng)*d (q) + d (k) + d (v), ...] flattened on dim 0. Weights and biases alike."""
    rest = q.shape[1:]
    per = num_heads // num_groups
    q = q.reshape(num_groups, per * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_from_mcore(qkv: torch.Tensor, *, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of qkv_to_mcore: megatron's fused qkv -> (q, k, v)."""
    rest = qkv.shape[1:]
    per = num_heads // num_groups
    grouped = qkv.reshape(num_groups, (per + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def split_stacked_qkv(qkv: torch.Tensor):
    """transformers' ViT fused qkv [q; k; v] (3*h rows) -> (q, k, v)."""
    return torch.chunk(qkv, 3, dim=0)


def stack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(q, k, v) -> transformers' ViT fused [q; k; v]."""
    return torch.cat([q, k, v], dim=0)


def expert_layout_of(gate_up: torch.Tensor, *, num_experts: int, hidden: int, ffn: int) -> str:
    """Decide from the shape which layout a fused gate_up_proj is in; raise when neither fits or both do."""
    shape = tuple(gate_up.shape)
    released, tf5 = (num_experts, hidden, 2 * ffn), (num_experts, 2 * ffn, hidden)
    if released == tf5 and shape == released:
        raise LayoutMismatch(
            f"gate_up_proj {shape}: hidden == 2*moe_intermediate_size, so the layout cannot be told from the shape; "
            "pass the expert layout explicitly (released or transformers5)."
        )
    if shape == released:
        return RELEASED
    if shape == tf5:
        return TRANSFORMERS5
    raise LayoutMismatch(
        f"gate_up_proj has shape {list(shape)}, which fits neither the released layout {list(released)} nor the "
        f"transformers-5 layout {list(tf5)} for num_experts={num_experts}, hidden={hidden}, "
        f"moe_intermediate_size={ffn}: the weights do not match the config."
    )


def gate_up_to_mcore(gate_up: torch.Tensor, layout: str) -> torch.Tensor:
    """Fused gate_up_proj in `layout` -> megatron experts weight1 [E, hidden, 2, F] (gate = index 0)."""
    if layout == TRANSFORMERS5:
        gate_up = gate_up.transpose(1, 2)
    e, h, two_f = gate_up.shape
    return gate_up.reshape(e, h, 2, two_f // 2).contiguous()


def gate_up_from_mcore(weight1: torch.Tensor, layout: str = RELEASED) -> torch.Tensor:
    """megatron weight1 [E, hidden, 2, F] -> fused gate_up_proj in `layout`."""
    e, h, _, f = weight1.shape
    out = weight1.reshape(e, h, 2 * f)
    return (out.transpose(1, 2) if layout == TRANSFORMERS5 else out).contiguous()


def down_to_mcore(down: torch.Tensor, layout: str) -> torch.Tensor:
    """Fused down_proj in `layout` -> megatron weight2 [E, F, hidden]."""
    return (down.transpose(1, 2) if layout == TRANSFORMERS5 else down).contiguous()


def down_from_mcore(weight2: torch.Tensor, layout: str = RELEASED) -> torch.Tensor:
    """megatron weight2 [E, F, hidden] -> fused down_proj in `layout`."""
    return (weight2.transpose(1, 2) if layout == TRANSFORMERS5 else weight2).contiguous()
