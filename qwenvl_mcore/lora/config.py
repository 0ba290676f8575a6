"""LoRA settings and the target names they choose from.

Kept free of torch and megatron imports: the training schema (qwenvl_mcore/training/config.py) embeds `LoRAConfig`
as its `peft` group, and composing a config must stay cheap.

Target names (one per kind of linear; each covers that linear in every layer / block / merger):

| name              | our module                                             | transformers + peft                                 |
| ----------------- | ------------------------------------------------------ | --------------------------------------------------- |
| q, k, v           | decoder.layers.N.self_attention.linear_qkv (fused)     | language_model.layers.N.self_attn.{q,k,v}_proj      |
| o                 | decoder.layers.N.self_attention.linear_proj            | ...self_attn.o_proj                                  |
| experts_gate_up   | decoder.layers.N.mlp.experts (weight1)                 | target_parameters ...mlp.experts.gate_up_proj       |
| experts_down      | decoder.layers.N.mlp.experts (weight2)                 | target_parameters ...mlp.experts.down_proj          |
| router            | decoder.layers.N.mlp.router                            | target_parameters ...mlp.gate.weight                |
| vit_qkv, vit_proj | vision.decoder.layers.B.self_attention.linear_{qkv,proj} | visual.blocks.B.attn.{qkv,proj}                   |
| vit_fc1, vit_fc2  | vision.decoder.layers.B.mlp.linear_fc{1,2}             | visual.blocks.B.mlp.linear_fc{1,2}                  |
| merger_fc1/fc2    | vision.merger / vision.deepstack_mergers.D linear_fc{1,2} | visual.merger / visual.deepstack_merger_list.D   |

Experts get one adapter per expert per fused tensor, as peft's `target_parameters` does: gate and up are one fused
tensor in transformers (`gate_up_proj`), so they share one adapter (A over the hidden size, B over both halves)
and cannot be targeted apart. Group names: `attention` (q, k, v, o), `experts` (gate_up, down), `vit` (the four ViT
linears), `mergers`, and `all` (everything except the router, which is excluded by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

LLM_ATTENTION = ("q", "k", "v", "o")
EXPERTS = ("experts_gate_up", "experts_down")
ROUTER = ("router",)
VIT = ("vit_qkv", "vit_proj", "vit_fc1", "vit_fc2")
MERGERS = ("merger_fc1", "merger_fc2")
TARGETS = LLM_ATTENTION + EXPERTS + ROUTER + VIT + MERGERS
GROUPS = {
    "attention": LLM_ATTENTION,
    "experts": EXPERTS,
    "vit": VIT,
    "mergers": MERGERS,
    "all": LLM_ATTENTION + EXPERTS + VIT + MERGERS,
}
METHODS = ("none", "lora")


class LoRAConfigError(ValueError):
    """A LoRA setting that cannot work; the message names the key and the valid values."""


@dataclass
class LoRAConfig:
    """The `peft` config group. `method=none` (the default) trains the full model; `lora` freezes it and trains
    adapters W + scale * B @ A on `targets`, scale = alpha / rank (alpha / sqrt(rank) with `rslora`)."""

    method: str = "none"  # none | lora
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # on the adapter's input (as peft); must be 0 on experts and router (peft refuses it too)
    rslora: bool = False
    targets: list[str] = field(default_factory=lambda: ["all"])
    seed: int = 0  # A's random init (drawn per global tensor, so any layout starts from the same adapters); B = 0
    # An HF PEFT adapter directory to start from instead of that init (lora/adapter_dir.py); its rank, alpha, rslora
    # and targets must be these. Ignored when the run resumes from a checkpoint (the checkpoint's adapters win).
    init_from: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.method == "lora"

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def target_set(self) -> frozenset[str]:
        """The target kinds named by `targets` (groups expanded); a clear error for unknown names."""
        return resolve_targets(self.targets)

    def validate(self) -> None:
        """Raise LoRAConfigError naming the key for anything that cannot work."""
        if self.method not in METHODS:
            raise LoRAConfigError(f"peft.method={self.method!r}: choose one of {', '.join(METHODS)}.")
        if not self.enabled:
            if self.init_from:
                raise LoRAConfigError(f"peft.init_from={self.init_from} starts LoRA adapters from a PEFT adapter: it "
                                      "needs peft=lora (and the adapter's peft.rank/alpha/rslora/targets).")
            return
        if self.rank < 1:
            raise LoRAConfigError(f"peft.rank={self.rank}: must be at least 1.")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LoRAConfigError(f"peft.alpha={self.alpha}: must be a finite number above 0.")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAConfigError(f"peft.dropout={self.dropout}: must lie in [0, 1).")
        kinds = self.target_set()
        if self.dropout > 0 and kinds & set(EXPERTS + ROUTER):
            raise LoRAConfigError(
                f"peft.dropout={self.dropout} with targets {sorted(kinds & set(EXPERTS + ROUTER))}: adapters on "
                "fused expert tensors and the router take no dropout (peft's target_parameters refuses it as well); "
                "set peft.dropout=0 or drop those targets.")


def resolve_targets(names) -> frozenset[str]:
    """Target names and group names -> the set of target kinds. Unknown names raise LoRAConfigError listing the
    valid ones; an empty list is an error too (nothing would train)."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise LoRAConfigError("peft.targets is empty: name at least one target "
                              f"({', '.join(TARGETS)}) or group ({', '.join(GROUPS)}).")
    unknown = [n for n in names if n not in TARGETS and n not in GROUPS]
    if unknown:
        hint = ""
        if any(n in ("gate", "up", "gate_proj", "up_proj") for n in unknown):
            hint = (" Gate and up are one fused tensor in transformers and peft: target them together as "
                    "experts_gate_up.")
        raise LoRAConfigError(
            f"peft.targets: unknown name(s) {unknown}. Valid targets: {', '.join(TARGETS)}; groups: "
            f"{', '.join(f'{g} ({'+'.join(m)})' for g, m in GROUPS.items())}.{hint}")
    kinds: set[str] = set()
    for n in names:
        kinds.update(GROUPS.get(n, (n,)))
    return frozenset(kinds)
