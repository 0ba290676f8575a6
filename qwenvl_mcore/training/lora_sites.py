"""Where the LoRA adapters sit and how wide they are, from the model config alone: the shapes the memory planner
counts (`training/memory.py`) and the widths the FLOP count uses (`training/metrics.py`).

This mirrors `qwenvl_mcore/lora/layers.py` (what `apply_lora` builds); tests/unit/test_plan_memory.py checks the
two agree tensor for tensor on the tiny model. Kept free of torch and megatron: composing and planning stay cheap.

Every adapted linear y = W x (fan_in -> fan_out) gets A (fan_in -> r) and B (r -> fan_out), sharded like its base:

| style          | base                          | A (this rank)          | B (this rank)               |
| -------------- | ----------------------------- | ---------------------- | --------------------------- |
| column         | ColumnParallelLinear          | [r, in] whole          | [out/tp, r]                 |
| row            | RowParallelLinear             | [r, in/tp]             | [out, r] whole              |
| expert_column  | experts' gate_up (weight1)    | [E/ep, in, r]          | [E/ep, r, out/etp]          |
| expert_row     | experts' down (weight2)       | [E/ep, in/etp, r]      | [E/ep, r, out]              |
| replicated     | the router                    | [r, in]                | [out, r]                    |

(experts' gate_up B is stored [E/ep, r, 2, F/etp]: the same elements.) Expert adapters are reduced and sharded over
the expert-data-parallel group like the experts' weights; the others over the data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenvl_mcore.lora.config import EXPERTS, LLM_ATTENTION, MERGERS, ROUTER, TARGETS, VIT, resolve_targets

STYLES = ("column", "row", "expert_column", "expert_row", "replicated")


@dataclass(frozen=True)
class AdapterSite:
    """One adapted linear of one LLM layer, ViT block or merger: its target kind, the model part its parameters
    belong to (`model.parameter_part`), its sharding style (table above) and the base's fan-in / fan-out (whole,
    before any split). `per_token` is how many times it runs per token of its sequence: the experts run k times
    (top-k routed copies), everything else once."""

    kind: str
    part: str
    style: str
    fan_in: int
    fan_out: int
    per_token: int = 1

    @property
    def expert(self) -> bool:
        return self.style.startswith("expert")

    def shapes(self, rank: int, *, tp: int = 1, ep: int = 1, etp: int = 1, num_experts: int = 0):
        """(A shape, B shape) on one rank."""
        i, o, r = self.fan_in, self.fan_out, rank
        if self.style == "column":
            return (r, i), (o // tp, r)
        if self.style == "row":
            return (r, i // tp), (o, r)
        if self.style == "replicated":
            return (r, i), (o, r)
        e = num_experts // ep
        if self.style == "expert_column":
            return (e, i, r), (e, r, o // etp)
        return (e, i // etp, r), (e, r, o)

    def flops_per_token(self, rank: int) -> int:
        """Forward + backward FLOPs of the adapter per token of its sequence: two GEMMs of r x (in + out) together,
        each run forward (2), for the input gradient (2) and for the weight gradient (2): 6 r (in + out), times
        `per_token`."""
        return 6 * rank * (self.fan_in + self.fan_out) * self.per_token


def language_layer_sites(args, kinds) -> list[AdapterSite]:
    """The adapted linears of one MoE decoder layer: q, k, v (the fused qkv, column), o (row), the router
    (replicated, h -> E), experts' gate_up (h -> 2F) and down (F -> h), each expert-parallel and run k times per
    token."""
    t = args.text
    h, d = t.hidden_size, t.head_dim
    q, g = t.num_attention_heads * d, t.num_key_value_heads * d
    f, k = t.moe_intermediate_size, t.num_experts_per_tok
    table = {
        "q": AdapterSite("q", "language", "column", h, q),
        "k": AdapterSite("k", "language", "column", h, g),
        "v": AdapterSite("v", "language", "column", h, g),
        "o": AdapterSite("o", "language", "row", q, h),
        "router": AdapterSite("router", "language", "replicated", h, t.num_experts),
        "experts_gate_up": AdapterSite("experts_gate_up", "language", "expert_column", h, 2 * f, per_token=k),
        "experts_down": AdapterSite("experts_down", "language", "expert_row", f, h, per_token=k),
    }
    assert set(table) == set(LLM_ATTENTION + ROUTER + EXPERTS)
    return [table[n] for n in table if n in kinds]


def vision_block_sites(args, kinds) -> list[AdapterSite]:
    """The adapted linears of one ViT block (the patch sequence, replicated over TP): qkv hv -> 3hv and fc1
    hv -> I (column), proj hv -> hv and fc2 I -> hv (row)."""
    v = args.vision
    hv, inter = v.hidden_size, v.intermediate_size
    table = {
        "vit_qkv": AdapterSite("vit_qkv", "vision", "column", hv, 3 * hv),
        "vit_proj": AdapterSite("vit_proj", "vision", "row", hv, hv),
        "vit_fc1": AdapterSite("vit_fc1", "vision", "column", hv, inter),
        "vit_fc2": AdapterSite("vit_fc2", "vision", "row", inter, hv),
    }
    assert set(table) == set(VIT)
    return [table[n] for n in table if n in kinds]


def merger_sites(args, kinds) -> list[AdapterSite]:
    """The adapted linears of one merger (the merger and each DeepStack merger, on merged tokens): fc1 m -> m
    (column), fc2 m -> out (row), m = hv * spatial_merge_size^2."""
    v = args.vision
    m = v.merged_hidden_size
    table = {
        "merger_fc1": AdapterSite("merger_fc1", "merger", "column", m, m),
        "merger_fc2": AdapterSite("merger_fc2", "merger", "row", m, v.out_hidden_size),
    }
    assert set(table) == set(MERGERS)
    return [table[n] for n in table if n in kinds]


@dataclass(frozen=True)
class LoRAShape:
    """What memory and FLOPs depend on in a LoRA run: the rank and the target kinds (groups expanded)."""

    rank: int
    kinds: frozenset

    @classmethod
    def of(cls, peft) -> "LoRAShape | None":
        """From the run's `peft` group (a LoRAConfig or the composed DictConfig node); None without LoRA."""
        if peft is None or getattr(peft, "method", "none") != "lora":
            return None
        return cls(rank=int(peft.rank), kinds=resolve_targets(list(peft.targets)))

    @property
    def ordered_kinds(self) -> list[str]:
        """The target kinds in the table's order (lora/config.py TARGETS)."""
        return [k for k in TARGETS if k in self.kinds]

    @property
    def vision_trains(self) -> bool:
        return bool(self.kinds & set(VIT))

    @property
    def merger_trains(self) -> bool:
        return bool(self.kinds & set(MERGERS))


__all__ = ["STYLES", "AdapterSite", "LoRAShape", "language_layer_sites", "vision_block_sites", "merger_sites"]
