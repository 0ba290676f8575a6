"""Apply the mapping table to a live model at any parallel layout: load HF tensors into each rank's shards, and
gather shards back into HF tensors.

A parameter's sharding is read from megatron's own attributes: `tensor_model_parallel` + `partition_dim` (TP for
dense layers, expert-TP for experts) and, for experts, dim 0 split over expert parallelism. Layer numbers are
local to a pipeline stage; `global_name` adds the stage's offset.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwenvl_mcore.models.qwen3_vl_moe import hf_mapping
from qwenvl_mcore.models.qwen3_vl_moe.hf_mapping import Context

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def global_name(model, local_name: str) -> str:
    """Local parameter name -> the mapping table's name (global LLM layer number)."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    offset = _unwrap(model).decoder.layers[int(m.group(1))].layer_number - 1 - int(m.group(1))
    return f"decoder.layers.{int(m.group(1)) + offset}." + local_name[m.end():]


def _base_parameters(model):
    """(local name, parameter) of the model's own weights: LoRA adapters (`p.lora`, qwenvl_mcore.lora) have no HF
    mapping rule; peft_io maps them."""
    return [(n, p) for n, p in model.named_parameters() if not getattr(p, "lora", False)]


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def _shard_groups(name: str, param: torch.Tensor):
    """[(dim, group)] this parameter is split along, outermost first."""
    groups = []
    if _is_expert(name):
        groups.append((0, parallel_state.get_expert_model_parallel_group()))
        if getattr(param, "tensor_model_parallel", False):
            groups.append((param.partition_dim, parallel_state.get_expert_tensor_parallel_group()))
    elif getattr(param, "tensor_model_parallel", False):
        groups.append((param.partition_dim, parallel_state.get_tensor_model_parallel_group()))
    return groups


def shard(full: torch.Tensor, name: str, param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global tensor for parameter `param`."""
    out = full
    for dim, group in _shard_groups(name, param):
        size = dist.get_world_size(group)
        if size > 1:
            out = torch.chunk(out, size, dim=dim)[dist.get_rank(group)]
    return out


def unshard(local: torch.Tensor, name: str, param: torch.Tensor) -> torch.Tensor:
    """The global tensor from every rank's slice (collective over the parameter's groups)."""
    out = local.contiguous()
    for dim, group in reversed(_shard_groups(name, param)):
        size = dist.get_world_size(group)
        if size > 1:
            parts = [torch.empty_like(out) for _ in range(size)]
            dist.all_gather(parts, out, group=group)
            out = torch.cat(parts, dim=dim)
    return out


def load_hf_weights(model, get_hf: Callable[[str], torch.Tensor], ctx: Context, *, strict: bool = True) -> None:
    """Copy HF tensors (fetched by name through `get_hf`) into this rank's parameters.

    Raises KeyError listing HF tensors that are missing, and ValueError listing parameters of the model (LoRA
    adapters aside) that no rule covers or whose shape does not match (`strict`).
    """
    model = _unwrap(model)
    rules = {m: (rule, hf) for rule, m, hf in hf_mapping.rules_for(ctx.args)}
    uncovered, mismatched = [], []
    with torch.no_grad():
        for local, param in _base_parameters(model):
            name = global_name(model, local)
            if name not in rules:
                uncovered.append(name)
                continue
            rule, hf_names = rules[name]
            full = rule.to_mcore([get_hf(h) for h in hf_names], ctx)
            part = shard(full, name, param)
            if tuple(part.shape) != tuple(param.shape):
                mismatched.append(f"{name}: checkpoint gives {list(part.shape)}, model expects {list(param.shape)}")
                continue
            param.copy_(part)
    if strict and (uncovered or mismatched):
        raise ValueError("weights do not fit the model:\n  " + "\n  ".join(
            [f"no mapping for parameter {n}" for n in uncovered] + mismatched))


def load_hf_state_dict(model, state: Mapping[str, torch.Tensor], ctx: Context) -> None:
    """load_hf_weights from an in-memory HF state dict, naming every missing tensor at once."""
    hf_of = {m: hs for _, m, hs in hf_mapping.rules_for(ctx.args)}
    wanted = {h for local, _ in _base_parameters(_unwrap(model)) for h in hf_of.get(global_name(model, local), ())}
    missing = sorted(wanted - set(state))
    if missing:
        raise KeyError(f"{len(missing)} tensors missing from the checkpoint: {missing[:20]}")
    load_hf_weights(model, state.__getitem__, ctx)


def gather_hf_tensors(model, ctx: Context, *, source: str = "param") -> dict[str, torch.Tensor]:
    """HF-named global tensors of this pipeline stage's parameters (source='param') or gradients ('grad';
    megatron DDP's `main_grad` when present), LoRA adapters aside. Collective over TP/EP/ETP: call on every rank."""
    model = _unwrap(model)
    rules = {m: rule for rule, m, _ in hf_mapping.rules_for(ctx.args)}
    hf_names = {m: hf for _, m, hf in hf_mapping.rules_for(ctx.args)}
    out: dict[str, torch.Tensor] = {}
    for local, param in _base_parameters(model):
        name = global_name(model, local)
        if source == "param":
            value = param.detach()
        else:
            value = getattr(param, "main_grad", None)
            if value is None:
                value = param.grad
            if value is None:
                value = torch.zeros_like(param)
        full = unshard(value.detach(), name, param)
        for hf_name, tensor in zip(hf_names[name], rules[name].to_hf(full, ctx)):
            out[hf_name] = tensor
    return out
