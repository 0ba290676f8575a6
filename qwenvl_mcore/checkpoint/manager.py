"""Training checkpoints: `<save>/step_0000100/` directories written atomically, a `latest` file naming the
newest complete one, and only the last K kept.

A step directory is a checkpoint in the sense of model_io (megatron torch_dist data + qwenvl_mcore.json + hf/),
so it loads at any layout and exports with tools/convert/mcore2hf.py like a converted one. Every call here is
collective: all ranks call it with their own sharded state.
"""

from __future__ import annotations

import os
import re
import shutil

import torch
import torch.distributed as dist

from qwenvl_mcore.checkpoint import model_io

LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(save_root: str) -> str | None:
    """The newest complete checkpoint under `save_root`, or None when there is none."""
    path = os.path.join(save_root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    ckpt = os.path.join(save_root, name)
    if not os.path.isdir(ckpt):
        raise model_io.CheckpointError(f"{path} names {name}, which does not exist; fix or delete {path}.")
    return ckpt


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(save_root: str, step: int, state: dict, *, hf_dir: str, dtype: torch.dtype,
                    keep: int | None = None, kind: str = "training") -> str:
    """Save `state`, a megatron sharded state dict holding at least the model's (model_io.model_sharded_state_dict;
    plus optimizer and other sharded state, and plain objects saved once), as `<save_root>/step_<step>`; `hf_dir`
    gives the config and processor files the checkpoint carries. Returns the checkpoint path. The directory
    appears, and `latest` moves, only once everything is written."""
    from megatron.core import dist_checkpointing

    final = os.path.join(save_root, step_dir_name(step))
    staging = model_io.staging_dir_for(final)
    if _is_rank0():
        os.makedirs(save_root, exist_ok=True)
        model_io.prepare_output(final, overwrite=True, mark=False)
    _barrier()
    dist_checkpointing.save(state, staging)
    _barrier()
    if _is_rank0():
        model_io.write_info(staging, kind=kind, dtype=dtype, step=step)
        model_io.copy_hf_side_files(hf_dir, os.path.join(staging, model_io.HF_SUBDIR))
        model_io.publish_output(staging, final)
        tmp = os.path.join(save_root, f".{LATEST_FILE}.tmp")
        with open(tmp, "w") as f:
            f.write(step_dir_name(step) + "\n")
        os.replace(tmp, os.path.join(save_root, LATEST_FILE))
        if keep is not None:
            prune(save_root, keep)
    _barrier()
    return final


def prune(save_root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` step directories (never the one `latest` names)."""
    latest = latest_checkpoint(save_root)
    steps = sorted((int(m.group(1)), name) for name in os.listdir(save_root) if (m := _STEP_DIR.match(name)))
    removed = []
    for _, name in steps[:-keep] if keep > 0 else steps:
        path = os.path.join(save_root, name)
        if latest is not None and os.path.samefile(path, latest):
            continue
        shutil.rmtree(path)
        removed.append(name)
    return removed
