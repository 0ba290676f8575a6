"""LoRA in the trainer (`peft=lora`): freezing the base, what a LoRA checkpoint holds, and the reference to the
base that a resume checks.

`prepare` runs after the base weights are loaded and before DDP wrapping: megatron's DDP and distributed optimizer
then see only the adapters as trainable, so the base gets no gradient buffer and no optimizer state and stays in
the model's dtype (the optimizer keeps fp32 master copies of the adapters only).

A LoRA run's checkpoint is the trainer's usual one (same manager, same optimizer and RNG state, same resume code)
with the model part narrowed to the adapters (`adapter_state`); its common training state carries `lora`: the
adapter settings and the base's reference {path, hash}. The base is never saved: a resume loads it again from
model.init_from, after `check_resume` has compared its hash with the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch
import torch.distributed as dist

from qwenvl_mcore.checkpoint import model_io
from qwenvl_mcore.lora.apply import apply_lora
from qwenvl_mcore.lora.config import LoRAConfig, LoRAConfigError

KIND = "lora"  # qwenvl_mcore.json `kind` of a LoRA training checkpoint (adapters only)
_ADAPTER_KEY = re.compile(r"\.lora_[AB]\.")
# Settings that change the adapters' shapes or the function they compute: a resume must keep them.
_FIXED = ("rank", "alpha", "rslora", "targets")
_SAMPLED_TENSORS = 8  # smallest stored tensors whose values enter the base hash


class BaseMismatch(LoRAConfigError):
    """The base given to a LoRA run is not the one its checkpoint's adapters were trained on."""


def lora_config(cfg) -> LoRAConfig:
    """The run's `peft` group as a LoRAConfig."""
    from omegaconf import OmegaConf

    return LoRAConfig(**OmegaConf.to_container(cfg.peft, resolve=True))


def refuse_as_base(info: model_io.CheckpointInfo) -> None:
    """A LoRA checkpoint holds no base weights: it cannot start a run (CheckpointError naming its base)."""
    if info.kind == KIND:
        with open(os.path.join(info.path, model_io.META_FILE)) as f:
            base = json.load(f).get("base", {}).get("path")
        raise model_io.CheckpointError(
            f"{info.path} is a LoRA checkpoint (adapters only, trained on the base {base}): it cannot be "
            f"model.init_from. Start from its base (model.init_from={base}) and resume the LoRA run from its "
            "checkpoint.dir with peft=lora.")


def base_hash(ckpt: str) -> str:
    """sha256 of a base checkpoint's identity: its model config (hf/config.json), its description
    (qwenvl_mcore.json: kind, dtype, source, step), its weight index (every stored tensor's key, global shape and
    dtype; not the storage chunks, so a re-save at another layout keeps the hash) and the values of its
    `_SAMPLED_TENSORS` smallest tensors (norms and biases: a few KiB, yet a fine-tune of the same architecture from
    the same source changes them). Reads no large tensor."""
    from qwenvl_mcore.checkpoint import dcp

    if model_io.init_source(ckpt).kind == model_io.HF_MODEL:
        return _hf_base_hash(ckpt)
    info = model_io.read_info(ckpt)
    with open(os.path.join(info.hf_dir, "config.json")) as f:
        config = json.load(f)
    meta = dcp.tensor_metadata(ckpt)
    index = sorted((k, list(m.size), str(m.properties.dtype)) for k, m in meta.items())
    h = hashlib.sha256()
    h.update(json.dumps({"config": config, "kind": info.kind, "dtype": info.dtype, "source": info.source,
                         "step": info.step, "index": index}, sort_keys=True).encode())
    smallest = sorted(meta, key=lambda k: (torch.Size(meta[k].size).numel(), k))[:_SAMPLED_TENSORS]
    requests = [(k, (0,) * len(meta[k].size), tuple(meta[k].size), meta[k].properties.dtype) for k in smallest]
    for key, t in zip(smallest, dcp.read_regions(ckpt, requests)):
        h.update(key.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hf_base_hash(hf_dir: str) -> str:
    """base_hash of an HF model directory: its config.json, its weight index (every tensor's name, shape and dtype,
    from the safetensors headers; not how they are split into files) and the values of its `_SAMPLED_TENSORS`
    smallest tensors. Another identity than the checkpoint hf2mcore converts from it (a LoRA run resumes with the
    base it started from, in the same form)."""
    from qwenvl_mcore.conversion import hf_io

    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    reader = hf_io.SafetensorsReader(hf_dir)
    index = sorted((k, list(i.shape), str(i.dtype)) for k, i in reader.infos.items())
    h = hashlib.sha256()
    h.update(json.dumps({"config": config, "kind": "hf", "index": index}, sort_keys=True).encode())
    smallest = sorted(reader.infos, key=lambda k: (reader.infos[k].nbytes, k))[:_SAMPLED_TENSORS]
    for key in smallest:
        h.update(key.encode())
        h.update(reader.get(key).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_reference(init_from: str | None) -> dict:
    """{path, hash} of the base a LoRA run starts from (model.init_from, resolved like the trainer resolves it: a
    checkpoint of ours or an HF model directory)."""
    if not init_from:
        raise LoRAConfigError("peft=lora needs model.init_from: the frozen base the adapters train on.")
    source = model_io.init_source(init_from)
    if source.kind == model_io.CHECKPOINT:
        refuse_as_base(model_io.read_info(source.path))
    return {"path": os.path.abspath(source.path), "hash": base_hash(source.path)}


def checkpoint_record(lora: LoRAConfig, base: dict) -> dict:
    """What a LoRA checkpoint's common training state says about it (read back by `check_resume`)."""
    return {"settings": {"method": lora.method, "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                         "rslora": lora.rslora, "targets": sorted(lora.target_set()), "seed": lora.seed},
            "base": dict(base)}


def check_resume(lora: LoRAConfig, saved_training: dict, base: dict | None, ckpt: str) -> None:
    """Refuse, before anything is built, a resume that cannot continue the checkpoint `ckpt`: full training from a
    LoRA checkpoint or the reverse, other adapter settings, or a base whose hash is not the reference's
    (BaseMismatch naming both). `saved_training`: the checkpoint's common "training" state; `base`: the run's
    base_reference (None without LoRA)."""
    record = saved_training.get("lora")
    if not lora.enabled:
        if record is not None:
            raise LoRAConfigError(
                f"{ckpt} is a LoRA checkpoint (adapters on the base {record['base']['path']}): resume it with "
                "peft=lora and its peft settings, or give this full-training run another checkpoint.dir.")
        return
    if record is None:
        raise LoRAConfigError(
            f"{ckpt} is a full-training checkpoint: peft=lora cannot resume it. Give the LoRA run another "
            f"checkpoint.dir (or trainer.dir); to train adapters on those weights, set model.init_from={ckpt}.")
    now = checkpoint_record(lora, base)["settings"]
    differ = [f"peft.{k}={now[k]!r} (checkpoint: {record['settings'][k]!r})" for k in _FIXED
              if now[k] != record["settings"][k]]
    if differ:
        raise LoRAConfigError(f"cannot resume the LoRA checkpoint {ckpt} with other adapter settings: "
                              f"{'; '.join(differ)}. Use the checkpoint's settings or another checkpoint.dir.")
    saved = record["base"]
    if base["hash"] != saved["hash"]:
        raise BaseMismatch(
            f"the LoRA checkpoint {ckpt} was trained on the base {saved['path']} (hash {saved['hash'][:16]}), but "
            f"model.init_from gives {base['path']} (hash {base['hash'][:16]}), which is another model (its config, "
            f"weight index or weights differ). Resume with model.init_from={saved['path']}, or start a new LoRA run "
            "(another checkpoint.dir, or checkpoint.resume=false).")


def prepare(chunks: list, lora: LoRAConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze this rank's chunks (base weights loaded, not yet DDP-wrapped) and add the adapters (apply_lora).
    Every pipeline stage must train something: otherwise a LoRAConfigError on every rank (collective)."""
    adapters = apply_lora(chunks, lora)
    empty = torch.tensor([float(any(not any(p.requires_grad for p in c.parameters()) for c in chunks))])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(empty, op=dist.ReduceOp.MAX)
    if empty.item():
        raise LoRAConfigError(f"peft.targets={list(lora.targets)} put no adapter on some pipeline stage, which "
                              "would have nothing to train: add LLM targets (attention, experts) or use parallel.pp=1.")
    return adapters


def adapter_state(model_state: dict) -> dict:
    """The model part of a LoRA checkpoint: model_io.model_sharded_state_dict narrowed to the adapters (the
    optimizer's sharded state is built from it, and holds only the adapters' state too)."""
    return {chunk: {k: v for k, v in part.items() if _ADAPTER_KEY.search(k)} for chunk, part in model_state.items()}


__all__ = ["KIND", "BaseMismatch", "adapter_state", "base_hash", "base_reference", "check_resume",
           "checkpoint_record", "lora_config", "prepare", "refuse_as_base"]
