"""apply_lora: put adapters on the targeted linears of the model chunks and freeze everything else."""

from __future__ import annotations

import math
import re
import zlib

import torch
import torch.distributed as dist

from qwenvl_mcore.conversion import engine
from qwenvl_mcore.lora.config import LoRAConfig, LoRAConfigError
from qwenvl_mcore.lora.layers import LoRAColumnParallelLinear, _Adapters, enable_lora

# Local module names (pipeline-stage numbering) of each target kind in Qwen3VLMoeModel.
_L = r"decoder\.layers\.\d+\."
_B = r"vision\.decoder\.layers\.\d+\."
_MERGER = r"vision\.(?:merger|deepstack_mergers\.\d+)\."
MODULE_PATTERNS: dict[str, str] = {
    "q": _L + r"self_attention\.linear_qkv",
    "k": _L + r"self_attention\.linear_qkv",
    "v": _L + r"self_attention\.linear_qkv",
    "o": _L + r"self_attention\.linear_proj",
    "experts_gate_up": _L + r"mlp\.experts",
    "experts_down": _L + r"mlp\.experts",
    "router": _L + r"mlp\.router",
    "vit_qkv": _B + r"self_attention\.linear_qkv",
    "vit_proj": _B + r"self_attention\.linear_proj",
    "vit_fc1": _B + r"mlp\.linear_fc1",
    "vit_fc2": _B + r"mlp\.linear_fc2",
    "merger_fc1": _MERGER + "linear_fc1",
    "merger_fc2": _MERGER + "linear_fc2",
}


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def target_kinds_of(module_name: str) -> list[str]:
    """Target kinds whose pattern the local module name matches (several for the fused qkv and the experts)."""
    return [k for k, pat in MODULE_PATTERNS.items() if re.fullmatch(pat, module_name)]


def apply_lora(chunks, cfg: LoRAConfig, *, init: bool = True) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze every parameter of `chunks` (this rank's model chunks, before DDP wrapping) and add trainable adapters
    to each module the config targets; return [(global adapter name, parameter)].

    A is drawn U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per global tensor from a generator seeded by (cfg.seed, global
    name), then sharded, so every layout starts from the same adapters; B starts at 0 (the model is unchanged).
    A target kind that matches no module on any rank is a LoRAConfigError (collective when torch.distributed is up).
    `init=False` leaves every adapter at 0 (a loader sets them; or a meta-device model, whose layout is all we need).
    """
    cfg.validate()
    if not cfg.enabled:
        raise LoRAConfigError("apply_lora called with peft.method=none")
    kinds = cfg.target_set()
    if cfg.dropout > 0 and any(_unwrap(c).config.tensor_model_parallel_size > 1 for c in chunks):
        # A replicated input (the ViT's column-parallel linears) would need the same dropout mask on every TP rank,
        # which nothing here guarantees yet.
        raise LoRAConfigError(f"peft.dropout={cfg.dropout} needs parallel.tp=1 for now; set peft.dropout=0.")
    matched = {k: 0 for k in sorted(kinds)}
    out = []
    for chunk in chunks:
        model = _unwrap(chunk)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in list(model.named_modules()):
            wanted = [k for k in target_kinds_of(name) if k in kinds]
            if not wanted:
                continue
            enable_lora(module, rank=cfg.rank, scale=cfg.scale, dropout=cfg.dropout)
            for kind in wanted:
                _add(module, kind, name)
                matched[kind] += 1
        for local, p in model.named_parameters():
            if getattr(p, "lora", False):
                global_name = engine.global_name(model, local)
                if init:
                    _init_a(p, global_name, cfg.seed)
                p.requires_grad_(True)
                out.append((global_name, p))
    counts = torch.tensor([matched[k] for k in matched], dtype=torch.long)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    missing = [k for k, n in zip(matched, counts.tolist()) if n == 0]
    if missing:
        raise LoRAConfigError(f"peft.targets: {missing} match no module of this model; drop them from peft.targets.")
    return out


def _add(module, kind: str, name: str) -> None:
    if kind in ("q", "k", "v"):
        if module.qkv_groups is None:
            module.qkv_groups = _qkv_groups(module, name)
        groups, rows = module.qkv_groups
        module.add_adapter(kind, groups * rows[kind])
    elif isinstance(module, LoRAColumnParallelLinear):
        module.add_adapter(kind, module.weight.shape[0])
    else:
        module.add_adapter(kind)


def _qkv_groups(module, name: str):
    """(local KV groups, rows per group of q, k, v) of the LLM's fused linear_qkv, from its config."""
    c = module.config
    tp = module.tp_group.size()
    groups = c.num_query_groups // tp
    d = c.kv_channels
    per = c.num_attention_heads // c.num_query_groups
    if groups * (per + 2) * d != module.weight.shape[0]:
        raise ValueError(f"{name}: {module.weight.shape[0]} rows do not fit {groups} groups of "
                         f"{per} q heads + k + v of dim {d}")
    return groups, {"q": per * d, "k": d, "v": d}


def _global_shape(name: str, p: torch.Tensor) -> list[int]:
    shape = list(p.shape)
    for dim, group in engine._shard_groups(name, p):
        shape[dim] *= dist.get_world_size(group)
    return shape


@torch.no_grad()
def _init_a(p: torch.nn.Parameter, global_name: str, seed: int) -> None:
    """A ~ U(+-1/sqrt(fan_in)) drawn whole then sharded (B stays 0)."""
    if ".lora_A." not in global_name:
        return
    shape = _global_shape(global_name, p)
    # fan_in: the input width, dim -1 of dense A [r, in], dim -2 of expert A [E, in, r]
    fan_in = shape[-2] if ".mlp.experts." in global_name else shape[-1]
    gen = torch.Generator().manual_seed((zlib.crc32(global_name.encode()) + 1_000_003 * seed) % (2**63))
    full = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) / math.sqrt(fan_in)
    p.copy_(engine.shard(full, global_name, p))


def adapter_parameters(chunks) -> list[tuple[str, torch.nn.Parameter]]:
    """[(global name, parameter)] of every adapter of this rank's chunks."""
    out = []
    for chunk in chunks:
        model = _unwrap(chunk)
        out.extend((engine.global_name(model, n), p) for n, p in model.named_parameters() if getattr(p, "lora", False))
    return out


def lora_modules(chunks):
    """[(chunk index, local module name, module)] of every adapted module."""
    return [(i, n, m) for i, c in enumerate(chunks) for n, m in _unwrap(c).named_modules() if isinstance(m, _Adapters)]
