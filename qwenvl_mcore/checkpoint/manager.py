"""Training checkpoints: `<save>/step_0000100/` directories written atomically, a `latest` file naming the
newest complete one, and only the last K kept.

A step directory is a checkpoint in the sense of model_io (megatron torch_dist data + qwenvl_mcore.json + hf/),
so it loads at any layout and exports with tools/convert/mcore2hf.py like a converted one. Every call here is
collective: all ranks call it with their own sharded state.
"""

from __future__ import annotations

import errno
import os
import re
import shutil

import torch
import torch.distributed as dist

from qwenvl_mcore.checkpoint import model_io, write_results

LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
# staging (model_io.staging_dir_for) and replaced (model_io.publish_output) step directories
_STALE = re.compile(r"^\.step_\d{7,}\.(incomplete|old-\d+-[0-9a-f]+)$")
_NEARLY_FULL = 64 * 2**20  # free bytes under which a failed save is taken for a full disk


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
                    keep: int | None = None, kind: str = "training", info: dict | None = None) -> str:
    """Save `state`, a megatron sharded state dict holding at least the model's (model_io.model_sharded_state_dict;
    plus optimizer and other sharded state, and plain objects saved once), as `<save_root>/step_<step>`; `hf_dir`
    gives the config and processor files the checkpoint carries; `kind` and `info` (extra keys) go into its
    qwenvl_mcore.json. Returns the checkpoint path. The directory
    appears, and `latest` moves, only once everything is written; `latest` never names a missing directory.
    A failed save (a full disk: ENOSPC) removes its partial directory and raises CheckpointError on every rank."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    final = os.path.join(save_root, step_dir_name(step))
    staging = model_io.staging_dir_for(final)
    error = None
    if _is_rank0():
        try:
            os.makedirs(save_root, exist_ok=True)
            model_io.prepare_output(final, overwrite=True, mark=False)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = e
    if _agreed_error(error, staging, save_root) is None:
        try:
            write_results.use_in_process_queue()
            dist_checkpointing.save(state, staging)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            error = e
        _barrier()  # every rank has written (or failed) before rank 0 publishes or removes the directory
        if _is_rank0() and error is None:
            try:
                model_io.write_info(staging, kind=kind, dtype=dtype, step=step, **(info or {}))
                model_io.copy_hf_side_files(hf_dir, os.path.join(staging, model_io.HF_SUBDIR))
                _publish(save_root, staging, final)
                if keep is not None:
                    prune(save_root, keep)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                error = e
    message = _agreed_error(error, staging, save_root)
    if message is not None:
        raise model_io.CheckpointError(message)
    return final


def _agreed_error(error: BaseException | None, staging: str, save_root: str) -> str | None:
    """Every rank learns whether any rank failed (the first failing rank's message); rank 0 then removes the
    partial staging directory. Collective."""
    message = None if error is None else _describe_save_error(error, staging, save_root)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, message)
        message = next((m for m in everyone if m is not None), None)
    if message is not None and _is_rank0():
        model_io.discard_output(staging)
    return message


def _describe_save_error(error: BaseException, staging: str, save_root: str) -> str:
    """What failed, where, and for a full disk (ENOSPC, which torch's writers often report only as
    "unexpected pos" or a bare OSError) that it is one."""
    texts, enospc = [], False
    stack = [error]
    while stack:  # the error, its causes, and the per-rank failures DCP wraps
        e = stack.pop()
        if e is None:
            continue
        enospc |= isinstance(e, OSError) and e.errno == errno.ENOSPC
        texts.append(f"{type(e).__name__}: {e}")
        stack += [e.__cause__, e.__context__]
        stack += [exc for exc, _ in getattr(e, "failures", {}).values()]
    text = "\n".join(texts)
    enospc |= any(marker in text for marker in ("No space left", "Errno 28", "unexpected pos"))
    try:
        free = shutil.disk_usage(save_root).free
    except OSError:
        free = None
    enospc |= free is not None and free < _NEARLY_FULL
    first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    if enospc:
        return (f"checkpoint save to {staging} failed: no space left on the device (ENOSPC) of {save_root} "
                f"({'?' if free is None else f'{free / 2**20:.0f} MiB'} free). The partial checkpoint was removed; "
                "free space there or point checkpoint.dir elsewhere, then start the same command again to resume "
                f"from the last checkpoint. ({first})")
    return f"checkpoint save to {staging} failed ({type(error).__name__}: {first}); the partial checkpoint was removed."


def _write_latest(save_root: str, name: str) -> None:
    tmp = os.path.join(save_root, f".{LATEST_FILE}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, os.path.join(save_root, LATEST_FILE))


def _publish(save_root: str, staging: str, final: str) -> None:
    """Rename the complete `staging` to `final` and point `latest` at it. Replacing an existing `final` that
    `latest` names: `latest` first moves to another step directory (the newest older one, else the oldest newer
    one), or is removed when there is none, so that it never names a directory renamed away."""
    latest_path = os.path.join(save_root, LATEST_FILE)
    if os.path.isdir(final) and os.path.isfile(latest_path):
        with open(latest_path) as f:
            named = f.read().strip()
        if named == os.path.basename(final):
            steps = step_dirs(save_root)
            at = steps.index(named)
            others = steps[:at] or steps[at + 1:][:1]
            if others:
                _write_latest(save_root, others[-1])
            else:
                os.remove(latest_path)
    model_io.publish_output(staging, final)
    _write_latest(save_root, os.path.basename(final))


def step_dirs(save_root: str) -> list[str]:
    """The step directories under `save_root`, oldest first."""
    if not os.path.isdir(save_root):
        return []
    steps = []
    for name in os.listdir(save_root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(save_root, name)):
            steps.append((int(m.group(1)), name))
    return [name for _, name in sorted(steps)]


def remove_stale_staging(save_root: str) -> list[str]:
    """Remove what killed saves leave under `save_root`: `.step_N.incomplete` staging directories and the
    `.step_N.old-*` directories a replaced checkpoint is moved to. Only names of that form, never a symlink;
    the caller holds the run's lock, so no save of its own is under way."""
    if not os.path.isdir(save_root):
        return []
    removed = []
    for name in sorted(os.listdir(save_root)):
        path = os.path.join(save_root, name)
        if _STALE.match(name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(name)
    return removed


def prune(save_root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` step directories (never the one `latest` names), and stale staging."""
    latest = latest_checkpoint(save_root)
    steps = step_dirs(save_root)
    removed = []
    for name in steps[:-keep] if keep > 0 else steps:
        path = os.path.join(save_root, name)
        if latest is not None and os.path.samefile(path, latest):
            continue
        shutil.rmtree(path)
        removed.append(name)
    return removed + remove_stale_staging(save_root)
