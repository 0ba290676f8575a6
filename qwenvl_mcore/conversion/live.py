"""HF safetensors straight into and out of a running model, at any layout, without a converted checkpoint.

- `load_hf_dir` (`model.init_from=<HF directory>`): every rank streams the HF tensors of its own parameters into
  them, one tensor at a time, through the mapping table (engine.load_hf_weights' rules). A rank reads only its
  pipeline stage's tensors; of a tensor split along its first axis (the experts over expert parallelism, and the
  plain dense weights split along their rows: embeddings, LM head) only the rows of its shard. The result is the
  same, bit for bit, as loading the checkpoint hf2mcore converts from the same directory: the transforms only move
  values, and both paths cast once to the model's dtype.
- `write_hf_dir` (`checkpoint.save_hf`): the model as an HF directory in the released expert layout (sharded
  safetensors + index), gathered one parameter at a time over its TP/EP/ETP groups and written by one rank per
  pipeline stage, so no rank ever holds more than one output shard and one gathered parameter. Collective.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwenvl_mcore.conversion import engine, hf_io
from qwenvl_mcore.conversion import transforms as T
from qwenvl_mcore.models.qwen3_vl_moe import hf_mapping
from qwenvl_mcore.models.qwen3_vl_moe.hf_mapping import Context

# Test hook: with this set to a directory, the writer of the first pipeline stage creates `hf_writing_<n>` there
# after its first shard of each export (n counts exports from 1) and waits for `hf_release` to appear
# (tests kill the run while an HF export is half written).
HOLD_ENV = "QW_TEST_HF_EXPORT_HOLD"


def expert_layout_of_dir(args, infos: dict[str, hf_io.TensorInfo]) -> str | None:
    """The experts' on-disk layout of an HF directory, from layer 0's gate_up_proj header (None: no experts)."""
    name = f"{hf_mapping.LM}.layers.0.mlp.experts.gate_up_proj"
    if name not in infos:
        return None
    t = args.text
    return T.expert_layout_of(torch.empty(infos[name].shape, device="meta"), num_experts=t.num_experts,
                              hidden=t.hidden_size, ffn=t.moe_intermediate_size)


def _row_split(name: str, param: torch.Tensor, rule) -> tuple[int, int] | None:
    """(index, count) of this rank's block of rows when the parameter's outermost split is along the first axis of
    an HF tensor that maps to it one to one along that axis (experts: the expert axis; plain weights split by
    rows), else None (the rank reads the whole tensor and slices it)."""
    groups = engine._shard_groups(name, param)
    if not groups or groups[0][0] != 0:
        return None
    if not (engine._is_expert(name) or rule.to_mcore is hf_mapping._identity_in):
        return None
    group = groups[0][1]
    return dist.get_rank(group), dist.get_world_size(group)


def load_hf_dir(chunks, hf_dir: str, args, infos: dict[str, hf_io.TensorInfo] | None = None) -> None:
    """Copy the HF directory's tensors into this rank's model chunks (see the module docstring). The directory is
    expected to be checked already (convert.check_hf_checkpoint); a tensor that does not fit is a ValueError."""
    reader = hf_io.SafetensorsReader(hf_dir, infos)
    ctx = Context(args, expert_layout=expert_layout_of_dir(args, reader.infos))
    rules = {m: (rule, hf) for rule, m, hf in hf_mapping.rules_for(args)}
    uncovered, mismatched = [], []
    with torch.no_grad():
        for chunk in chunks:
            model = engine._unwrap(chunk)
            for local, param in engine._base_parameters(model):
                name = engine.global_name(model, local)
                if name not in rules:
                    uncovered.append(name)
                    continue
                rule, hf_names = rules[name]
                rows = _row_split(name, param, rule)
                if rows is None:
                    part = engine.shard(rule.to_mcore([reader.get(h) for h in hf_names], ctx), name, param)
                else:
                    index, count = rows
                    n = reader.infos[hf_names[0]].shape[0]
                    if n % count:
                        raise ValueError(f"{hf_names[0]}: {n} rows do not split over {count} ranks")
                    block = n // count
                    part = rule.to_mcore([reader.get_rows(h, index * block, (index + 1) * block) for h in hf_names],
                                         ctx)
                    for dim, group in engine._shard_groups(name, param)[1:]:  # the inner splits (expert TP)
                        size = dist.get_world_size(group)
                        if size > 1:
                            part = torch.chunk(part, size, dim=dim)[dist.get_rank(group)]
                if tuple(part.shape) != tuple(param.shape):
                    mismatched.append(f"{name}: {hf_dir} gives {list(part.shape)}, the model expects "
                                      f"{list(param.shape)}")
                    continue
                param.copy_(part)
    if uncovered or mismatched:
        raise ValueError("the HF weights do not fit the model:\n  " + "\n  ".join(
            [f"no mapping for parameter {n}" for n in uncovered] + mismatched))


# -- writing -------------------------------------------------------------------------------------------------------
def _global_shape(name: str, param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    for dim, group in engine._shard_groups(name, param):
        shape[dim] *= dist.get_world_size(group)
    return shape


def _stage_units(chunks, args, ctx: Context, dtype: torch.dtype | None):
    """[(global name, local parameter, [(hf name, bytes)])] of this rank's base parameters, in order."""
    rules = {m: rule for rule, m, _ in hf_mapping.rules_for(args)}
    hf_names = {m: hf for _, m, hf in hf_mapping.rules_for(args)}
    units = []
    for chunk in chunks:
        model = engine._unwrap(chunk)
        for local, param in engine._base_parameters(model):
            name = engine.global_name(model, local)
            meta = torch.empty(_global_shape(name, param), dtype=param.dtype, device="meta")
            out_dtype = dtype or param.dtype
            sizes = [(h, math.prod(t.shape) * out_dtype.itemsize)
                     for h, t in zip(hf_names[name], rules[name].to_hf(meta, ctx))]
            units.append((name, param, sizes))
    return units


def write_hf_dir(chunks, args, out_dir: str, *, max_shard_bytes: int, dtype: torch.dtype | None = None,
                 adjust=None) -> dict:
    """Write the model's weights into `out_dir` (existing, seen by every rank) as HF safetensors shards (released
    expert layout) and their index; config and processor files are the caller's. `adjust(hf_name, tensor,
    expert_layout)` changes each HF tensor before its cast to `dtype` (default: the parameter's), e.g. LoRA merged
    (lora/export.py: MergeLoRA). Collective over every rank. Returns {"tensors", "shards", "bytes"}; raises the
    first write error (after every rank has finished its part, so the collectives stay matched)."""
    ctx = Context(args, expert_layout=T.RELEASED)
    rules = {m: rule for rule, m, _ in hf_mapping.rules_for(args)}
    units = _stage_units(chunks, args, ctx, dtype)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    plan = [(name, sizes) for name, _, sizes in units]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (stage, plan))
    writers, plans = {}, {}
    for rank, (s, p) in enumerate(everyone):
        if s not in writers:
            writers[s], plans[s] = rank, p
    shards, owner = [], []  # global list of shards, each a list of parameter names; the stage writing it
    for s in sorted(plans):
        bytes_of = {name: sum(n for _, n in sizes) for name, sizes in plans[s]}
        for shard in hf_io.plan_shards([(name, bytes_of[name]) for name, _ in plans[s]], max_shard_bytes):
            shards.append(shard)
            owner.append(s)
    n_shards = len(shards)
    hf_of = {name: sizes for s in plans for name, sizes in plans[s]}
    writer = writers[stage] == dist.get_rank()
    by_name = {name: param for name, param, _ in units}
    hold = os.environ.get(HOLD_ENV)
    error = None
    written_first = False
    for i, shard in enumerate(shards):
        if owner[i] != stage:
            continue
        tensors = {}
        for name in shard:
            param = by_name[name]
            full = engine.unshard(param.detach(), name, param)  # collective over this stage's TP/EP/ETP groups
            if writer:
                for (h, _), t in zip(hf_of[name], rules[name].to_hf(full, ctx)):
                    if adjust is not None:
                        t = adjust(h, t, T.RELEASED)
                    tensors[h] = t.to(dtype or param.dtype).contiguous()
            del full
        if writer and error is None:
            try:
                hf_io.write_shard(os.path.join(out_dir, hf_io.shard_file_name(i, n_shards)), tensors)
            except Exception as e:  # noqa: BLE001 - raised below, once every rank is past its collectives
                error = e
        del tensors
        if writer and hold and stage == 0 and not written_first:
            written_first = True
            _hold(hold)
    if dist.get_rank() == 0 and error is None:
        try:
            names = [[h for name in shard for h, _ in hf_of[name]] for shard in shards]
            hf_io.write_index(out_dir, names, sum(n for sizes in hf_of.values() for _, n in sizes))
        except Exception as e:  # noqa: BLE001
            error = e
    if error is not None:
        raise error
    return {"tensors": sum(len(s) for s in hf_of.values()), "shards": n_shards,
            "bytes": sum(n for sizes in hf_of.values() for _, n in sizes)}


_exports = 0


def _hold(hold: str) -> None:
    global _exports
    _exports += 1
    open(os.path.join(hold, f"hf_writing_{_exports}"), "w").close()
    while not os.path.exists(os.path.join(hold, "hf_release")):
        time.sleep(0.05)
