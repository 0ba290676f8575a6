"""Our adapters <-> peft's tensors for transformers' Qwen3VLMoeForConditionalGeneration (names and layouts).

peft names a tensor `base_model.model.<HF module>.lora_{A,B}.weight` (the saved form; in memory `.default` sits
before `.weight`). Layouts, peft -> ours (global tensors; E experts, r rank, F moe width, h hidden):
- plain linears (q, k, v, o, router, ViT proj/fc1/fc2, mergers): the same A [r, in] and B [out, r];
- ViT qkv: one adapter on transformers' fused [q; k; v] linear; B's rows reordered like the weight into megatron's
  per-head [q_h; k_h; v_h] (the LLM's q, k, v are three peft adapters and stay three here, see layers.py);
- experts (`target_parameters` on the fused 3-D tensors): peft's A [E*r, in] is expert-major (view [E, r, in]),
  its B [out, r*E] expert-minor (view [out, r, E]); ours are [E, in, r] and [E, r, out] (out = 2F as [2, F] for
  gate_up, gate half first). When both gate_up_proj and down_proj are targeted peft nests its wrappers and names
  gate_up's tensors `...mlp.experts.base_layer.lora_*` and down's `...mlp.experts.lora_*`; on import the shapes
  decide (they always differ), so either nesting loads.

No peft import here: production code only reads and writes tensors and the config's fields.
"""

from __future__ import annotations

import re

import torch

from qwenvl_mcore.conversion import engine
from qwenvl_mcore.conversion import transforms as T
from qwenvl_mcore.lora.apply import _global_shape, _unwrap
from qwenvl_mcore.lora.config import EXPERTS, LoRAConfig

PEFT_PREFIX = "base_model.model."
LM, VIT = "model.language_model.layers", "model.visual"

# (our global module name pattern, transformers module name template) per target kind
_MODULES: dict[str, tuple[str, str]] = {
    "q": (r"decoder\.layers\.(\d+)\.self_attention\.linear_qkv", LM + ".{0}.self_attn.q_proj"),
    "k": (r"decoder\.layers\.(\d+)\.self_attention\.linear_qkv", LM + ".{0}.self_attn.k_proj"),
    "v": (r"decoder\.layers\.(\d+)\.self_attention\.linear_qkv", LM + ".{0}.self_attn.v_proj"),
    "o": (r"decoder\.layers\.(\d+)\.self_attention\.linear_proj", LM + ".{0}.self_attn.o_proj"),
    "experts_gate_up": (r"decoder\.layers\.(\d+)\.mlp\.experts", LM + ".{0}.mlp.experts"),
    "experts_down": (r"decoder\.layers\.(\d+)\.mlp\.experts", LM + ".{0}.mlp.experts"),
    "router": (r"decoder\.layers\.(\d+)\.mlp\.router", LM + ".{0}.mlp.gate"),
    "vit_qkv": (r"vision\.decoder\.layers\.(\d+)\.self_attention\.linear_qkv", VIT + ".blocks.{0}.attn.qkv"),
    "vit_proj": (r"vision\.decoder\.layers\.(\d+)\.self_attention\.linear_proj", VIT + ".blocks.{0}.attn.proj"),
    "vit_fc1": (r"vision\.decoder\.layers\.(\d+)\.mlp\.linear_fc1", VIT + ".blocks.{0}.mlp.linear_fc1"),
    "vit_fc2": (r"vision\.decoder\.layers\.(\d+)\.mlp\.linear_fc2", VIT + ".blocks.{0}.mlp.linear_fc2"),
    "merger_fc1": (r"vision\.(merger|deepstack_mergers\.\d+)\.linear_fc1", VIT + ".{0}.linear_fc1"),
    "merger_fc2": (r"vision\.(merger|deepstack_mergers\.\d+)\.linear_fc2", VIT + ".{0}.linear_fc2"),
}
# transformers' module-name regexes for peft's target_modules, and its target_parameters
_HF_MODULE_REGEX = {
    "q": LM + r"\.\d+\.self_attn\.q_proj", "k": LM + r"\.\d+\.self_attn\.k_proj",
    "v": LM + r"\.\d+\.self_attn\.v_proj", "o": LM + r"\.\d+\.self_attn\.o_proj",
    "vit_qkv": VIT + r"\.blocks\.\d+\.attn\.qkv", "vit_proj": VIT + r"\.blocks\.\d+\.attn\.proj",
    "vit_fc1": VIT + r"\.blocks\.\d+\.mlp\.linear_fc1", "vit_fc2": VIT + r"\.blocks\.\d+\.mlp\.linear_fc2",
    "merger_fc1": VIT + r"\.(?:merger|deepstack_merger_list\.\d+)\.linear_fc1",
    "merger_fc2": VIT + r"\.(?:merger|deepstack_merger_list\.\d+)\.linear_fc2",
}
_HF_PARAMETERS = {"experts_gate_up": "mlp.experts.gate_up_proj", "experts_down": "mlp.experts.down_proj",
                  "router": "mlp.gate.weight"}


def _hf_module(kind: str, module: str) -> str:
    pattern, template = _MODULES[kind]
    m = re.fullmatch(pattern, module)
    if m is None:
        raise ValueError(f"{module} is not a {kind} module")
    group = m.group(1).replace("deepstack_mergers", "deepstack_merger_list")
    return template.format(group)


def _split_name(global_name: str) -> tuple[str, str, str]:
    """'decoder.layers.0.mlp.experts.lora_A.experts_down' -> (module, 'A', kind)."""
    module, _, rest = global_name.rpartition(".lora_")
    ab, _, kind = rest.partition(".")
    return module, ab, kind


def peft_key(global_name: str, targets: frozenset[str]) -> str:
    """peft's saved name of one of our adapter tensors, nesting as peft does for the experts' two parameters."""
    module, ab, kind = _split_name(global_name)
    hf = _hf_module(kind, module)
    if kind == "experts_gate_up" and "experts_down" in targets:
        hf += ".base_layer"  # peft wraps gate_up_proj (registered first) inside down_proj's wrapper
    return f"{PEFT_PREFIX}{hf}.lora_{ab}.weight"


def to_peft_layout(kind: str, ab: str, t: torch.Tensor, args) -> torch.Tensor:
    """One global adapter tensor in our layout -> peft's."""
    if kind in EXPERTS:
        e, r = t.shape[0], (t.shape[-1] if ab == "A" else t.shape[1])
        if ab == "A":  # [E, in, r] -> [E*r, in]
            return t.transpose(1, 2).reshape(e * r, -1).contiguous()
        return t.reshape(e, r, -1).permute(2, 1, 0).reshape(-1, r * e).contiguous()  # [E, r, out] -> [out, r*E]
    if kind == "vit_qkv" and ab == "B":
        v = args.vision
        return T.stack_qkv(*T.qkv_from_mcore(t, num_heads=v.num_heads, num_groups=v.num_heads, head_dim=v.head_dim))
    return t


def from_peft_layout(kind: str, ab: str, t: torch.Tensor, args, our_shape) -> torch.Tensor:
    """One peft tensor -> our global layout of shape `our_shape`."""
    if kind in EXPERTS:
        e, r = our_shape[0], (our_shape[-1] if ab == "A" else our_shape[1])
        if ab == "A":  # [E*r, in] -> [E, in, r]
            return t.reshape(e, r, -1).transpose(1, 2).reshape(our_shape).contiguous()
        return t.reshape(-1, r, e).permute(2, 1, 0).reshape(our_shape).contiguous()  # [out, r*E] -> [E, r, out]
    if kind == "vit_qkv" and ab == "B":
        v = args.vision
        return T.qkv_to_mcore(*T.split_stacked_qkv(t), num_heads=v.num_heads, num_groups=v.num_heads,
                              head_dim=v.head_dim)
    return t


def _targets_of(chunks) -> frozenset[str]:
    kinds = set()
    for chunk in chunks:
        for n, p in _unwrap(chunk).named_parameters():
            if getattr(p, "lora", False):
                kinds.add(_split_name(n)[2])
    return frozenset(kinds)


def gather_peft_tensors(chunks, args, *, source: str = "param", targets: frozenset[str] | None = None
                        ) -> dict[str, torch.Tensor]:
    """peft-named global tensors of this rank's adapters (`source` 'param', or 'grad': `main_grad` when megatron's
    DDP keeps one). Collective over TP/EP/ETP like engine.gather_hf_tensors: call on every rank. `targets`: the
    config's target kinds, which decide peft's nesting of the expert names (default: those present here)."""
    targets = _targets_of(chunks) if targets is None else targets
    out = {}
    for chunk in chunks:
        model = _unwrap(chunk)
        for local, p in model.named_parameters():
            if not getattr(p, "lora", False):
                continue
            name = engine.global_name(model, local)
            value = p.detach() if source == "param" else getattr(p, "main_grad", None)
            if source != "param" and value is None:
                value = p.grad if p.grad is not None else torch.zeros_like(p)
            full = engine.unshard(value.detach(), name, p)
            _, ab, kind = _split_name(name)
            out[peft_key(name, targets)] = to_peft_layout(kind, ab, full, args)
    return out


def strip_adapter_name(key: str, adapter: str = "default") -> str:
    """In-memory peft names (`...lora_A.default.weight`) -> the saved form (`...lora_A.weight`)."""
    return key.replace(f".lora_A.{adapter}.", ".lora_A.").replace(f".lora_B.{adapter}.", ".lora_B.")


@torch.no_grad()
def load_peft_tensors(chunks, args, tensors: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy a peft adapter's tensors (saved names, `PEFT_PREFIX` optional) into this rank's adapters.

    Every adapter of ours must find its tensor (KeyError naming the missing ones); with `strict`, tensors of the
    adapter that no adapter of ours takes are an error too (ValueError naming them: e.g. a target the config lacks).
    Shapes must match exactly (ValueError naming the tensor and both shapes: another rank or architecture).
    """
    tensors = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in tensors.items()}
    used, missing, bad = set(), [], []
    for chunk in chunks:
        model = _unwrap(chunk)
        for local, p in model.named_parameters():
            if not getattr(p, "lora", False):
                continue
            name = engine.global_name(model, local)
            module, ab, kind = _split_name(name)
            shape = _global_shape(name, p)
            hf = _hf_module(kind, module)
            candidates = [f"{PEFT_PREFIX}{hf}.lora_{ab}.weight"]
            if kind in EXPERTS:
                candidates.append(f"{PEFT_PREFIX}{hf}.base_layer.lora_{ab}.weight")
            want = to_peft_layout(kind, ab, torch.empty(shape, device="meta"), args).shape
            found = [k for k in candidates if k in tensors and tuple(tensors[k].shape) == tuple(want)]
            if not found:
                present = [f"{k} {list(tensors[k].shape)}" for k in candidates if k in tensors]
                (bad if present else missing).append(
                    f"{candidates[0]}: expected {list(want)}" + (f", adapter has {present}" if present else ""))
                continue
            key = found[0]
            used.add(key)
            full = from_peft_layout(kind, ab, tensors[key].to(p.dtype), args, shape)
            p.copy_(engine.shard(full, name, p))
    if missing:
        raise KeyError(f"{len(missing)} adapter tensors missing from the peft adapter: {missing[:10]}")
    if bad:
        raise ValueError("peft adapter tensors do not fit the model (rank or architecture):\n  " + "\n  ".join(bad))
    extra = sorted(set(tensors) - used)
    if strict and extra and _single_stage():
        raise ValueError(f"{len(extra)} tensors of the peft adapter fit no adapter of the model (targets not in "
                         f"peft.targets?): {extra[:10]}")


def _single_stage() -> bool:
    # Under pipeline parallelism each stage loads only its layers: only a single-stage rank can tell.
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size() == 1


def peft_config_fields(cfg: LoRAConfig) -> dict:
    """The fields of peft's LoraConfig (adapter_config.json) that describe `cfg` on transformers'
    Qwen3VLMoeForConditionalGeneration: target_modules as one regex over module names, target_parameters for the
    experts and the router."""
    kinds = cfg.target_set()
    modules = [_HF_MODULE_REGEX[k] for k in sorted(kinds) if k in _HF_MODULE_REGEX]
    params = [_HF_PARAMETERS[k] for k in sorted(kinds) if k in _HF_PARAMETERS]
    return {
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "target_modules": ("(?:" + "|".join(modules) + ")") if modules else [],
        "target_parameters": params or None,
    }


def adapter_config_json(cfg: LoRAConfig, base_model: str | None = None) -> dict:
    """adapter_config.json of `cfg` as peft reads it (PeftConfig.from_pretrained)."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
            "inference_mode": True, "fan_in_fan_out": False, "init_lora_weights": True, **peft_config_fields(cfg)}


def save_peft_adapter(chunks, args, cfg: LoRAConfig, out_dir, *, base_model: str | None = None):
    """Write this model's adapters as an HF PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors, fp32 as trained, peft's names and layouts). Collective: every rank calls it;
    pipeline stages send their tensors to global rank 0, which writes and returns the directory (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tensors = {k: v.cpu() for k, v in gather_peft_tensors(chunks, args, targets=cfg.target_set()).items()}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, tensors, group=group)
        tensors = {k: v for part in parts for k, v in part.items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return write_peft_adapter(tensors, cfg, out_dir, base_model=base_model)


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def write_peft_adapter(tensors: dict[str, torch.Tensor], cfg: LoRAConfig, out_dir, *,
                       base_model: str | None = None):
    """Write peft-named global tensors (gather_peft_tensors' form) and `cfg` as an HF PEFT adapter directory."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_json(cfg, base_model), indent=2) + "\n")
    return out


def hf_weight_name(global_name: str) -> str:
    """The transformers weight one of our adapter tensors updates: `...q_proj.weight`, `...mlp.experts.gate_up_proj`,
    `...mlp.gate.weight` (what W + scale * B @ A merges into)."""
    module, _, kind = _split_name(global_name)
    hf = _hf_module(kind, module)
    return hf + {"experts_gate_up": ".gate_up_proj", "experts_down": ".down_proj"}.get(kind, ".weight")


__all__ = ["PEFT_PREFIX", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "peft_key", "gather_peft_tensors",
           "load_peft_tensors", "peft_config_fields", "adapter_config_json", "save_peft_adapter",
           "write_peft_adapter", "hf_weight_name",
           "strip_adapter_name", "to_peft_layout", "from_peft_layout"]
