"""A LoRA training checkpoint out to HF: an HF PEFT adapter directory (`mcore2hf --adapter-only`) or a full HF
checkpoint with the adapters merged into the base (`mcore2hf --merge-lora`).

A LoRA checkpoint (`qwenvl_mcore.json`: kind `lora`, `base: {path, hash}`) holds the adapters as global tensors
under our names; its common training state says the adapter settings (training.py: checkpoint_record). Both exports
read the adapters straight from the checkpoint (no model is built: the stored layout comes from a meta-device model
at TP = EP = PP = 1 with the same adapters), in the dtype they are stored in (the model's: what the run computes
with), and map them to peft's names and layouts (peft_io).

The merge streams the base like any export (conversion/convert.py: mcore_to_hf, one tensor at a time, `--procs`
processes): each transformers weight an adapter targets becomes W + scale * B @ A computed in fp32 from peft's
tensors (peft's own formula, per expert for the fused expert tensors) and cast to the output dtype (the stored
one unless --dtype). The base is the checkpoint's reference (or `base=`, a moved copy); its hash must be the
reference's, as for a resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from qwenvl_mcore.checkpoint import model_io
from qwenvl_mcore.lora.config import LoRAConfig

# Module-level imports stay light (no megatron): the export's spawned process unpickles its function from here before
# it can hide the libraries' known notices (qwenvl_mcore/library_noise.py).

KIND = "lora"  # training.KIND (not imported: training.py pulls the trainer's checkpoint code)


@dataclass(frozen=True)
class LoRACheckpoint:
    path: str  # the step directory
    settings: LoRAConfig
    base: dict  # {path, hash} of the base the adapters were trained on
    dtype: str  # the stored dtype of the adapters (the run's model.dtype)
    hf_dir: str  # the base model's config and processor files, carried by the checkpoint


def read_lora_checkpoint(mcore: str, *, flag: str) -> LoRACheckpoint:
    """The LoRA checkpoint `mcore` names (a step directory, a save directory or a trainer.dir); UsageError (naming
    `flag`) when it is another kind of checkpoint."""
    from qwenvl_mcore.conversion.convert import UsageError

    ckpt = model_io.resolve_checkpoint_dir(mcore)
    info = model_io.read_info(ckpt)
    if info.kind != KIND:
        raise UsageError(f"{flag} exports a LoRA training checkpoint (kind {KIND!r} in {model_io.META_FILE}), but "
                         f"{ckpt} is a {info.kind!r} checkpoint, which holds the whole model: export it without "
                         f"{flag}.")
    with open(os.path.join(ckpt, model_io.META_FILE)) as f:
        base = json.load(f).get("base")
    record = _saved_lora_record(ckpt)
    if not base or record is None:
        raise model_io.CheckpointError(f"{ckpt}: a LoRA checkpoint without its base reference or adapter settings "
                                       "(written by another release?): it cannot be exported.")
    settings = LoRAConfig(**record["settings"])
    return LoRACheckpoint(ckpt, settings, base, info.dtype, info.hf_dir)


def _saved_lora_record(ckpt: str) -> dict | None:
    """training.lora of the checkpoint's common state (read through the pickle allow-list)."""
    from megatron.core import dist_checkpointing

    from qwenvl_mcore.checkpoint import safe_unpickle

    safe_unpickle.install()
    with safe_unpickle.checkpoint_errors(ckpt):
        common = dist_checkpointing.load_common_state_dict(ckpt)
    training = common.get("training") if isinstance(common, dict) else None
    return training.get("lora") if isinstance(training, dict) else None


def adapter_layout(args, cfg: LoRAConfig) -> list[model_io.StoredParam]:
    """Where every adapter tensor of `cfg` sits in a LoRA checkpoint of the model `args` (global tensors), from a
    meta-device model at TP = EP = PP = 1 (needs megatron's parallel state at that layout)."""
    from qwenvl_mcore.lora.apply import apply_lora
    from qwenvl_mcore.models.qwen3_vl_moe.model import Qwen3VLMoeModel
    from qwenvl_mcore.parallel import ParallelLayout

    with torch.device("meta"):
        model = Qwen3VLMoeModel(args, ParallelLayout(), dtype=torch.float32, use_cpu_initialization=False,
                                perform_initialization=False)
    apply_lora([model], cfg, init=False)
    return [p for p in model_io.unsharded_params(model) if ".lora_A." in p.name or ".lora_B." in p.name]


def _read_adapters_rank(rank: int, world: int, ckpt: str, config: dict, settings: dict
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({peft key: global tensor}, {peft key: the transformers weight it updates}) of LoRA checkpoint `ckpt` (one
    process; returned to the caller)."""
    from qwenvl_mcore.checkpoint.dcp import read_regions, tensor_metadata
    from qwenvl_mcore.lora import peft_io
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    args = args_from_hf_config(config)
    cfg = LoRAConfig(**settings)
    layout = adapter_layout(args, cfg)
    model_io.check_fits(ckpt, [p.chunk for p in layout])  # adapters missing or of another shape: named
    stored = tensor_metadata(ckpt)
    regions = read_regions(ckpt, [(p.chunk.key, p.chunk.offsets, p.chunk.sizes,
                                   stored[p.chunk.key].properties.dtype) for p in layout])
    tensors, weights = {}, {}
    targets = cfg.target_set()
    for p, region in zip(layout, regions):
        _, ab, kind = peft_io._split_name(p.name)
        key = peft_io.peft_key(p.name, targets)
        tensors[key] = peft_io.to_peft_layout(kind, ab, region.reshape(p.shape), args)
        weights[key] = peft_io.hf_weight_name(p.name)
    return tensors, weights


def read_peft_tensors(lora: LoRACheckpoint, config: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({peft key: tensor}, {peft key: the transformers weight it updates}) of a LoRA checkpoint (one spawned
    process, which sets up megatron's parallel state for the layout)."""
    from qwenvl_mcore.parallel.spawn import run_on_ranks

    settings = {k: getattr(lora.settings, k) for k in ("method", "rank", "alpha", "dropout", "rslora", "targets",
                                                       "seed")}
    return run_on_ranks(_read_adapters_rank, 1, lora.path, config, settings)[0]


def _base_model_name(lora: LoRACheckpoint, base_ckpt: str, given: str | None) -> str | None:
    """adapter_config.json's base_model_name_or_path: as given, else the HF directory the base was converted from."""
    if given:
        return given
    if model_io.is_hf_model_dir(base_ckpt) and not os.path.isfile(os.path.join(base_ckpt, model_io.META_FILE)):
        return os.path.abspath(base_ckpt)  # the run started from this HF directory
    try:
        return model_io.read_info(base_ckpt).source
    except model_io.CheckpointError:
        return None


def export_adapter(mcore: str, out: str, *, dtype: str | None = None, base_model_name: str | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """mcore2hf --adapter-only: the LoRA checkpoint `mcore` as an HF PEFT adapter directory `out`
    (adapter_config.json + adapter_model.safetensors), loadable by peft.PeftModel.from_pretrained on the base
    exported to HF. `dtype` casts the tensors (default: as stored)."""
    from qwenvl_mcore.conversion.convert import DTYPES, _building, _check_args
    from qwenvl_mcore.lora import peft_io
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, load_hf_config

    _check_args(1, dtype)
    model_io.check_output_apart(out, [mcore])
    lora = read_lora_checkpoint(mcore, flag="--adapter-only")
    inputs = [mcore, lora.path]
    model_io.check_output_apart(out, inputs)
    config = load_hf_config(lora.hf_dir)
    args_from_hf_config(config)
    with _building(out, overwrite=overwrite, inputs=inputs) as staging:
        tensors, _ = read_peft_tensors(lora, config)
        if dtype:
            tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
        peft_io.write_peft_adapter(tensors, lora.settings, staging,
                                   base_model=_base_model_name(lora, lora.base["path"], base_model_name))
    return {"kind": "peft_adapter", "tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors.values()),
            "rank": lora.settings.rank, "targets": sorted(lora.settings.target_set()),
            "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None}


class MergeLoRA:
    """W + scale * B @ A on the transformers weights the adapters target, in fp32 (the export casts after); the
    callable mcore_to_hf applies to each exported tensor. Picklable: it travels to the export's processes."""

    def __init__(self, tensors: dict[str, torch.Tensor], weights: dict[str, str], scale: float):
        self.scale = scale
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, weight in weights.items():
            if ".lora_A." in key:
                self.pairs[weight] = (tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")])
        self.expert_weights = {w for w in self.pairs if w.endswith((".gate_up_proj", ".down_proj"))}

    @property
    def weights(self) -> set[str]:
        return set(self.pairs)

    def __call__(self, name: str, w: torch.Tensor, expert_layout: str) -> torch.Tensor:
        pair = self.pairs.get(name)
        if pair is None:
            return w
        a, b = (t.to(torch.float32) for t in pair)
        if name in self.expert_weights:
            # peft: A [E*r, in] expert-major, B [out, r*E] expert-minor; delta_e = B_e @ A_e, [E, out, in]
            e = w.shape[0]
            r = a.shape[0] // e
            delta = torch.bmm(b.reshape(b.shape[0], r, e).permute(2, 0, 1), a.reshape(e, r, -1))
            if expert_layout == "released":  # stored [E, in, out]; transformers 5's own layout is [E, out, in]
                delta = delta.transpose(1, 2)
        else:
            delta = b @ a
        if delta.shape != w.shape:
            raise ValueError(f"{name}: the adapter's update {list(delta.shape)} does not fit the weight "
                             f"{list(w.shape)} ({expert_layout} expert layout)")
        return w.to(torch.float32) + self.scale * delta


def live_merger(chunks: list, args, lora: LoRAConfig) -> MergeLoRA:
    """MergeLoRA of the adapters of this rank's pipeline stage in a live model, for an HF export of the run
    (checkpoint.save_hf: conversion/live.py applies it to each HF tensor). Collective over TP/EP/ETP (the adapters
    are gathered with peft_io.gather_peft_tensors)."""
    from qwenvl_mcore.conversion import engine
    from qwenvl_mcore.lora import peft_io

    targets = lora.target_set()
    tensors = peft_io.gather_peft_tensors(chunks, args, targets=targets)
    weights = {}
    for chunk in chunks:
        model = engine._unwrap(chunk)
        for local, p in model.named_parameters():
            if getattr(p, "lora", False):
                name = engine.global_name(model, local)
                weights[peft_io.peft_key(name, targets)] = peft_io.hf_weight_name(name)
    return MergeLoRA(tensors, weights, lora.scale)


def merge_lora(mcore: str, out: str, *, base: str | None = None, config_dir: str | None = None,
               dtype: str | None = None, expert_layout: str = "released", max_shard_size: str | int = "5GB",
               procs: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """mcore2hf --merge-lora: the base of LoRA checkpoint `mcore` (its reference, or `base`: a moved copy with the
    same hash) exported to HF with every targeted weight merged, W + scale * B @ A (fp32, then the output dtype)."""
    from qwenvl_mcore.conversion.convert import ConversionError, mcore_to_hf
    from qwenvl_mcore.lora import training as lora_training
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, load_hf_config
    from qwenvl_mcore.models.qwen3_vl_moe.hf_mapping import rules_for

    model_io.check_output_apart(out, [mcore, base, config_dir])
    lora = read_lora_checkpoint(mcore, flag="--merge-lora")
    saved = lora.base
    base_ckpt = model_io.resolve_checkpoint_dir(base or saved["path"])
    if not os.path.exists(base_ckpt):
        raise ConversionError(f"the base of the LoRA checkpoint {lora.path}, {saved['path']}, is missing: pass "
                              "--base DIR, the base checkpoint (moved or copied; its hash must match).")
    hf_base = model_io.init_source(base_ckpt, key="the base").kind == model_io.HF_MODEL  # model.init_from=<HF dir>
    if not hf_base:
        lora_training.refuse_as_base(model_io.read_info(base_ckpt))
    found = lora_training.base_hash(base_ckpt)
    if found != saved["hash"]:
        raise ConversionError(
            f"the LoRA checkpoint {lora.path} was trained on the base {saved['path']} (hash {saved['hash'][:16]}), "
            f"but {'--base gives' if base else 'that path now holds'} {os.path.abspath(base_ckpt)} (hash "
            f"{found[:16]}), another model (its config, weight index or weights differ). Pass --base with the "
            "checkpoint the adapters were trained on.")
    config = load_hf_config(config_dir or lora.hf_dir)
    args = args_from_hf_config(config)
    model_io.check_output_apart(out, [mcore, lora.path, base_ckpt, config_dir])
    tensors, weights = read_peft_tensors(lora, config)
    merger = MergeLoRA(tensors, weights, lora.settings.scale)
    unknown = merger.weights - {h for _, _, hs in rules_for(args) for h in hs}
    if unknown:  # a mapping bug, never silently unmerged
        raise RuntimeError(f"adapters target weights the export does not write: {sorted(unknown)[:5]}")
    if hf_base:  # streamed from the HF files (one process), the config and processor files the base's
        from qwenvl_mcore.conversion.convert import hf_to_hf

        result = hf_to_hf(base_ckpt, out, dtype=dtype, expert_layout=expert_layout, max_shard_size=max_shard_size,
                          overwrite=overwrite, adjust=merger, also_reads=[mcore, lora.path])
    else:
        result = mcore_to_hf(base_ckpt, out, config_dir=config_dir, dtype=dtype, expert_layout=expert_layout,
                             max_shard_size=max_shard_size, procs=procs, overwrite=overwrite, progress=progress,
                             adjust=merger, also_reads=[mcore, lora.path])
    result.update(merged=len(merger.weights), base=os.path.abspath(base_ckpt), scale=lora.settings.scale)
    return result


__all__ = ["KIND", "LoRACheckpoint", "MergeLoRA", "adapter_layout", "export_adapter", "live_merger", "merge_lora",
           "read_lora_checkpoint", "read_peft_tensors"]
