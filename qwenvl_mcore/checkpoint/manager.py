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
                    keep: int | None = None, kind: str = "training", info: dict | None = None,
                    files: dict[str, str] | None = None, hf_export=None) -> str:
    """Save `state`, a megatron sharded state dict holding at least the model's (model_io.model_sharded_state_dict;
    plus optimizer and other sharded state, and plain objects saved once), as `<save_root>/step_<step>`; `hf_dir`
    gives the config and processor files the checkpoint carries; `kind` and `info` (extra keys) go into its
    qwenvl_mcore.json; `files` (name -> text) are written into it by rank 0. Returns the checkpoint path. The
    directory appears, and `latest` moves, only once everything is written; `latest` never names a missing directory.
    A failed save (a full disk: ENOSPC) removes its partial directory and raises CheckpointError on every rank.
    `hf_export(dir)`, collective, writes HF weights into the checkpoint's hf/ first (checkpoint.save_hf); they are
    published with the rest, never alone."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    final, staging = _begin(save_root, step)
    error = None
    try:
        write_results.use_in_process_queue()
        dist_checkpointing.save(state, staging)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        error = e
    if hf_export is not None:  # after megatron's save, which expects an empty directory
        message = _agreed_error(error, staging, save_root)
        if message is not None:
            raise model_io.CheckpointError(message)
        _export_hf(hf_export, save_root, staging)
    _finish(error, save_root, staging, final, step=step, hf_dir=hf_dir, dtype=dtype, keep=keep, kind=kind,
            info=info, files=files)
    return final


def _begin(save_root: str, step: int) -> tuple[str, str]:
    """(final, staging) paths of step `step`'s save, with an empty staging directory made by rank 0. Collective."""
    final = os.path.join(save_root, step_dir_name(step))
    staging = model_io.staging_dir_for(final)
    error = None
    if _is_rank0():
        try:
            os.makedirs(save_root, exist_ok=True)
            model_io.prepare_output(final, overwrite=True, mark=False)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = e
    message = _agreed_error(error, staging, save_root)
    if message is not None:
        raise model_io.CheckpointError(message)
    return final, staging


def _finish(error: BaseException | None, save_root: str, staging: str, final: str, *, step: int, hf_dir: str,
            dtype: torch.dtype, keep: int | None, kind: str, info: dict | None, files: dict[str, str] | None) -> None:
    """After every rank's write (`error`: this rank's failure, or None): rank 0 completes the staging directory and
    publishes it (rename, `latest`, keep-last-K), or every rank raises the first failure and rank 0 removes the
    partial directory. Collective."""
    _barrier()  # every rank has written (or failed) before rank 0 publishes or removes the directory
    if _is_rank0() and error is None:
        try:
            model_io.write_info(staging, kind=kind, dtype=dtype, step=step, **(info or {}))
            # overwrite=False: an HF export's config.json (save_hf) records its weights' dtype
            model_io.copy_hf_side_files(hf_dir, os.path.join(staging, model_io.HF_SUBDIR), overwrite=False)
            for name, text in (files or {}).items():
                with open(os.path.join(staging, name), "w") as f:
                    f.write(text)
            _publish(save_root, staging, final)
            if keep is not None:
                prune(save_root, keep)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = e
    message = _agreed_error(error, staging, save_root)
    if message is not None:
        raise model_io.CheckpointError(message)


def _export_hf(hf_export, save_root: str, staging: str) -> None:
    """checkpoint.save_hf: `hf_export(<staging>/hf)` on every rank (the model as it is now: an asynchronous save
    exports before training goes on); a failure on any rank removes the staging directory and raises
    CheckpointError on every rank. Collective."""
    if hf_export is None:
        return
    error = None
    try:
        if _is_rank0():
            os.makedirs(os.path.join(staging, model_io.HF_SUBDIR), exist_ok=True)
        _barrier()
        hf_export(os.path.join(staging, model_io.HF_SUBDIR))
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        error = e
    message = _agreed_error(error, staging, save_root)
    if message is not None:
        raise model_io.CheckpointError(f"HF export (checkpoint.save_hf): {message}")


# The test hook of asynchronous saves: with this set to a directory, each save's writer process first creates
# `writing_<step>_<rank>` there, then waits for `release_<step>` or `release_all` to appear (tests/multirank/
# test_async_save.py holds a write in flight with it, to signal or kill the run mid-write).
HOLD_ENV = "QW_TEST_ASYNC_SAVE_HOLD"


class AsyncSaver:
    """checkpoint.async_save=true: megatron's asynchronous dist-checkpoint save (AsyncCallsQueue with its
    TemporalAsyncCaller: the save is planned on every rank, then one forked process per rank writes its files
    while training goes on; the fork is the snapshot, so later steps cannot change what is written). Finalization
    (torch's .metadata, megatron's metadata.json, then our qwenvl_mcore.json, hf/, `files`, the rename and `latest`)
    runs in the trainer once the write is over on every rank: `latest` never names a partial checkpoint, and a
    process killed mid-write leaves only `.step_N.incomplete`, which the next start removes.

    At most one save is in flight: `save` first waits for the previous one. Every method is collective; call
    `poll` at the same point of every step on every rank, `wait` before exiting, `abort` on the way out of a failure.
    The writer's results come back through a file (write_results.use_file_queue), never a Manager process."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._calls = AsyncCallsQueue(persistent=False)
        self._pending: dict | None = None  # the save in flight: its paths, step, and published path once final

    @property
    def pending(self) -> str | None:
        """The step directory being written, or None."""
        return None if self._pending is None else self._pending["final"]

    def save(self, save_root: str, step: int, state: dict, *, hf_dir: str, dtype: torch.dtype,
             keep: int | None = None, kind: str = "training", info: dict | None = None,
             files: dict[str, str] | None = None, hf_export=None) -> str:
        """Start saving `state` as `<save_root>/step_<step>` (arguments as `save_checkpoint`); returns the path it
        will have. A failure to plan raises CheckpointError at once on every rank; a failure to write, when the
        save is finalized (`poll`, `wait`, the next `save`)."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        self.wait()
        final, staging = _begin(save_root, step)
        rank = dist.get_rank() if dist.is_initialized() else 0
        error = request = None
        try:
            write_results.use_file_queue(os.path.join(staging, f".write_results.rank{rank}"))
            request = dist_checkpointing.save(state, staging, async_sharded_save=True, async_strategy="mcore")
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            error = e
        message = _agreed_error(error, staging, save_root)
        if message is not None:
            raise model_io.CheckpointError(message)
        # synchronous, before training goes on: the weights of this step (after megatron's planning, which expects
        # an empty directory; the forked writer starts when the request is scheduled below)
        _export_hf(hf_export, save_root, staging)
        finalizers = list(request.finalize_fns)

        def finalize() -> None:
            error = None
            try:
                for fn in finalizers:  # torch's .metadata and megatron's metadata.json: collective, errors on all ranks
                    fn()
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported to every rank by _finish
                error = e
            self._pending = None
            _finish(error, save_root, staging, final, step=step, hf_dir=hf_dir, dtype=dtype, keep=keep, kind=kind,
                    info=info, files=files)

        write = request.async_fn
        request = request._replace(async_fn=None if write is None else _writer(write, step), finalize_fns=[finalize])
        self._pending = {"final": final, "staging": staging, "save_root": save_root}
        self._calls.schedule_async_request(request)
        return final

    def poll(self) -> None:
        """Finalize the save in flight if every rank has written it; otherwise return at once. Collective (one
        small all-reduce) while a save is in flight, nothing otherwise."""
        if self._pending is not None:
            self._calls.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Wait for the save in flight to be written on every rank, and finalize it. Collective."""
        if self._pending is not None:
            self._calls.maybe_finalize_async_calls(blocking=True)

    def abort(self) -> None:
        """On the way out of a failure (not collective): end this rank's writer, publish nothing; rank 0 removes the
        staging directory (the next start would remove it anyway)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        for call in self._calls.async_calls:
            process = getattr(call.async_caller, "process", None)
            call.async_caller.close(abort=True)  # SIGKILL, no join
            if process is not None:
                process.join(timeout=30)
        self._calls.async_calls.clear()
        if _is_rank0():
            model_io.discard_output(pending["staging"])


def _writer(write, step: int):
    """The writer process's function: it dies with its trainer (a writer outliving a killed trainer would hold the
    run's lock, shared through the fork, and write into a directory the next start removes), uses one intra-op
    thread (a forked child must not reuse the trainer's OpenMP pool) at a lower CPU priority than training (the
    trainer's cores are the writer's), honours the test hook (HOLD_ENV), then runs megatron's writer."""
    trainer_pid = os.getpid()

    def run(*args, **kwargs):
        _die_with_parent(trainer_pid)
        torch.set_num_threads(1)
        try:
            os.nice(10)
        except OSError:
            pass
        hold = os.environ.get(HOLD_ENV)
        if hold:
            import time

            rank = dist.get_rank() if dist.is_initialized() else 0
            open(os.path.join(hold, f"writing_{step}_{rank}"), "w").close()
            while not any(os.path.exists(os.path.join(hold, n)) for n in (f"release_{step}", "release_all")):
                time.sleep(0.05)
        write(*args, **kwargs)

    return run


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


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); exit at once if it already has."""
    import ctypes
    import signal as signals
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signals.SIGKILL))  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)
