"""Our megatron checkpoints: what they contain and how the model is saved into and loaded from them.

A checkpoint directory holds a megatron `torch_dist` distributed checkpoint (global tensors, loadable at any
TP/EP/ETP/PP layout), plus what makes it describe itself:

    qwenvl_mcore.json   format version, kind ("converted" | "training"), dtype, source, step
    hf/                 config.json and the tokenizer / processor / chat-template files of the model

The model's state is `model_sharded_state_dict(chunks)`: every parameter as a megatron ShardedTensor under its
global name (layers stacked along a leading axis, experts along the expert axis). Local (non-TE) layers carry
no extra state, so megatron's per-linear `_extra_state` objects (always None here) are left out: converted and
trained checkpoints then hold exactly the same keys.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenvl_mcore.checkpoint import safe_unpickle
from qwenvl_mcore.checkpoint.dcp import Chunk, tensor_metadata
from qwenvl_mcore.checkpoint.errors import CheckpointError  # noqa: F401 - defined there, used here and by callers

FORMAT_VERSION = 1
META_FILE = "qwenvl_mcore.json"
HF_SUBDIR = "hf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    kind: str
    dtype: str
    step: int | None
    source: str | None

    @property
    def hf_dir(self) -> str:
        return os.path.join(self.path, HF_SUBDIR)


def write_info(ckpt_dir: str, *, kind: str, dtype: torch.dtype, source: str | None = None,
               step: int | None = None, **extra) -> None:
    info = {"format_version": FORMAT_VERSION, "kind": kind, "dtype": str(dtype).removeprefix("torch."),
            "step": step, "source": source, **extra}
    with open(os.path.join(ckpt_dir, META_FILE), "w") as f:
        json.dump(info, f, indent=2)


def read_info(ckpt_dir: str) -> CheckpointInfo:
    """The checkpoint's description; a clear error when `ckpt_dir` is not one of our checkpoints."""
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        hint = ""
        if os.path.isfile(os.path.join(ckpt_dir, "config.json")):
            hint = " It looks like an HF model directory: convert it first with tools/convert/hf2mcore.py."
        elif os.path.isfile(os.path.join(ckpt_dir, "latest")):
            hint = f" It is a training save directory: pass {os.path.join(ckpt_dir, 'latest')!r} or a step directory."
        elif os.path.isdir(os.path.join(ckpt_dir, "checkpoints")):
            hint = (f" It looks like a training run directory without a complete checkpoint yet "
                    f"({os.path.join(ckpt_dir, 'checkpoints', 'latest')} is missing).")
        elif not os.path.isdir(ckpt_dir):
            hint = " No such directory."
        raise CheckpointError(f"{ckpt_dir} is not a qwenvl-mcore checkpoint (no {META_FILE}).{hint}")
    with open(path) as f:
        info = json.load(f)
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {info.get('format_version')} is not {FORMAT_VERSION}; "
                              "convert the checkpoint again with this release.")
    return CheckpointInfo(ckpt_dir, info["kind"], info["dtype"], info.get("step"), info.get("source"))


def copy_hf_side_files(src_dir: str, dst_dir: str, *, overwrite: bool = True) -> list[str]:
    """Copy config, tokenizer, processor and chat-template files (everything but weights and their index);
    `overwrite=False` keeps files `dst_dir` already has (an HF export's own config.json)."""
    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if not os.path.isfile(src) or name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEX_FILES:
            continue
        if not overwrite and os.path.exists(os.path.join(dst_dir, name)):
            continue
        shutil.copy2(src, os.path.join(dst_dir, name))
        copied.append(name)
    return copied


# -- what model.init_from names --------------------------------------------------------------------------------
HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")  # conversion/hf_io.py: INDEX_FILE, SINGLE_FILE
CHECKPOINT, HF_MODEL = "checkpoint", "hf"


@dataclass(frozen=True)
class InitSource:
    """What `model.init_from` names: one of our checkpoints (`kind` CHECKPOINT: a converted one, a training step,
    save or run directory; `path` resolved to the step directory) or an HF model directory (`kind` HF_MODEL:
    config.json + safetensors, released or transformers-5 expert layout, streamed into the run's layout)."""

    kind: str
    path: str

    @property
    def hf_dir(self) -> str:
        """The directory with config.json and the tokenizer / processor files."""
        return os.path.join(self.path, HF_SUBDIR) if self.kind == CHECKPOINT else self.path


def is_hf_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHT_FILES)


def init_source(path: str, *, key: str = "model.init_from") -> InitSource:
    """Tell a checkpoint of ours from an HF model directory; CheckpointError naming what was expected otherwise."""
    resolved = resolve_checkpoint_dir(path)
    if os.path.isfile(os.path.join(resolved, META_FILE)):
        return InitSource(CHECKPOINT, resolved)
    if is_hf_model_dir(path):
        return InitSource(HF_MODEL, path)
    expected = (f"expected a qwenvl-mcore checkpoint (a directory with {META_FILE}: tools/convert/hf2mcore.py's "
                "output, a training step directory, its save directory with `latest`, or a trainer.dir) or an HF "
                f"model directory (config.json with {HF_WEIGHT_FILES[1]} or {HF_WEIGHT_FILES[0]})")
    if not os.path.isdir(path):
        found = "no such directory"
    elif os.path.isfile(os.path.join(path, "config.json")):
        weights = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES) or n in WEIGHT_INDEX_FILES)
        found = (f"it has config.json but {'only ' + ', '.join(weights[:3]) if weights else 'no weight files'}: only "
                 "safetensors HF checkpoints are read (save it with save_pretrained(safe_serialization=True))")
    elif any(n.endswith(".safetensors") for n in os.listdir(path)):
        found = "it has safetensors files but no config.json"
    elif os.path.isdir(os.path.join(path, "checkpoints")):
        found = (f"a training run directory without a complete checkpoint yet "
                 f"({os.path.join(path, 'checkpoints', 'latest')} is missing)")
    else:
        found = "it holds neither"
    raise CheckpointError(f"{key}={path}: {found}; {expected}.")


# -- the model's sharded state --------------------------------------------------------------------------------
def _drop_extra_state(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out[k] = _drop_extra_state(v)
        elif not k.endswith("._extra_state"):
            out[k] = v
    return out


def model_sharded_state_dict(chunks) -> dict:
    """megatron sharded state dict of this rank's model chunks: {"model": ...} or {"model0": ..., "model1": ...}."""
    chunks = list(chunks)
    if len(chunks) == 1:
        return {"model": _drop_extra_state(chunks[0].sharded_state_dict())}
    return {f"model{i}": _drop_extra_state(c.sharded_state_dict()) for i, c in enumerate(chunks)}


def _sharded_tensors(sd: dict):
    from megatron.core.dist_checkpointing import ShardedTensor

    for name, v in sd.items():
        if isinstance(v, ShardedTensor):
            yield name, v


@dataclass(frozen=True)
class StoredParam:
    """Where one whole parameter sits in a checkpoint: `chunk` (megatron stacks layers along a leading axis of
    its key, so the chunk may have extra size-1 axes) and the parameter's own `shape`."""

    name: str  # parameter name, global layer numbers
    chunk: Chunk
    shape: tuple[int, ...]


def unsharded_params(model) -> list[StoredParam]:
    """Every parameter of an unsharded model (TP = EP = PP = 1, e.g. built on the meta device) as a converted
    checkpoint stores it, derived from megatron's own sharded state dict."""
    out = []
    for name, sh in _sharded_tensors(_drop_extra_state(model.sharded_state_dict())):
        sizes = (1,) * sh.prepend_axis_num + tuple(sh.data.shape)
        chunk = Chunk(sh.key, tuple(sh.global_shape), sh.dtype, tuple(sh.global_offset), sizes)
        out.append(StoredParam(name, chunk, tuple(sh.data.shape)))
    return out


def check_fits(ckpt_dir: str, expected: list[Chunk]) -> None:
    """Raise CheckpointError listing every tensor the model expects that the checkpoint lacks or stores with
    another global shape (a checkpoint of a different architecture than the config)."""
    stored = tensor_metadata(ckpt_dir)
    missing, wrong = [], []
    by_key = {c.key: c for c in expected}
    for key in sorted(by_key):
        c = by_key[key]
        if key not in stored:
            missing.append(key)
        elif tuple(stored[key].size) != c.global_shape:
            wrong.append(f"{key}: checkpoint {list(stored[key].size)}, config {list(c.global_shape)}")
    if missing or wrong:
        lines = [f"missing: {k}" for k in missing[:20]] + wrong[:20]
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not fit the model config ({len(missing)} tensors missing, {len(wrong)} with "
            "another shape); it was made for a different architecture. Use the config it was converted with "
            f"(its {HF_SUBDIR}/config.json):\n  " + "\n  ".join(lines))


def save_model(ckpt_dir: str, chunks) -> None:
    """Save this rank's model chunks with megatron's distributed checkpointing (collective; `ckpt_dir` exists)."""
    from megatron.core import dist_checkpointing

    from qwenvl_mcore.checkpoint import write_results

    write_results.use_in_process_queue()
    dist_checkpointing.save(model_sharded_state_dict(chunks), ckpt_dir)


def load_model(ckpt_dir: str, chunks) -> None:
    """Load the model weights of a checkpoint (converted or trained, any layout) into this rank's chunks."""
    from megatron.core import dist_checkpointing

    chunks = list(chunks)
    sd = model_sharded_state_dict(chunks)
    expected = [Chunk(sh.key, tuple(sh.global_shape), sh.dtype, (), ()) for part in sd.values()
                for _, sh in _sharded_tensors(part)]
    check_fits(ckpt_dir, expected)  # reads the metadata through the allow-list and checks the data files first
    safe_unpickle.install()
    with safe_unpickle.checkpoint_errors(ckpt_dir):
        loaded = dist_checkpointing.load(sd, ckpt_dir)
    parts = [loaded["model"]] if len(chunks) == 1 else [loaded[f"model{i}"] for i in range(len(chunks))]
    for chunk, state in zip(chunks, parts):
        missing, unexpected = chunk.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("._extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{ckpt_dir}: parameters not restored {missing[:10]}, unexpected {unexpected[:10]}")


STAGING_MARKER = ".qwenvl_mcore_staging"  # proves a leftover staging directory is ours to remove


def staging_dir_for(out: str) -> str:
    """Where an output is built before it is renamed into place (a sibling, so the rename is atomic)."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.incomplete")


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def check_output_apart(out: str, inputs) -> None:
    """Refuse an output (or its staging directory) equal to, inside or containing one of `inputs` (paths or
    None; symlinks resolved): replacing or publishing it would destroy or change what the command reads."""
    targets = {os.path.realpath(out), os.path.realpath(staging_dir_for(out))}
    for given in inputs:
        if given is None:
            continue
        real = os.path.realpath(given)
        if any(_overlap(t, real) for t in targets):
            raise CheckpointError(f"output {out} overlaps the input {given} ({real}): it must be neither the input, "
                                  "inside it, nor contain it. Choose another --out.")


def prepare_output(out: str, *, overwrite: bool, inputs=(), mark: bool = True) -> str:
    """Refuse an output that overlaps `inputs`, or exists unless `overwrite`; return a new, empty staging
    directory for it, marked as ours. A leftover staging directory is removed only if it has our marker; the
    caller guarantees that nobody else builds the same output (converters: the output's lock). `mark=False` is
    for a caller that owns every staging name it uses (the trainer's step directories, under the run's lock):
    a leftover is removed as is and no marker is written (megatron warns about a non-empty save directory)."""
    check_output_apart(out, inputs)
    if os.path.lexists(out):
        if not overwrite:
            raise CheckpointError(f"output {out} exists; pass --overwrite to replace it.")
        if os.path.islink(out) or not os.path.isdir(out):
            raise CheckpointError(f"output {out} exists and is not a directory; remove it or choose another --out.")
    staging = staging_dir_for(out)
    if os.path.lexists(staging):
        if os.path.islink(staging) or (mark and not os.path.isfile(os.path.join(staging, STAGING_MARKER))):
            raise CheckpointError(f"{staging} exists and was not made by qwenvl-mcore (no {STAGING_MARKER}); "
                                  "move or remove it, or choose another --out.")
        shutil.rmtree(staging)  # a killed run's: its owner no longer holds the output
    os.makedirs(os.path.dirname(staging), exist_ok=True)
    os.mkdir(staging)  # mode from the umask, like any directory the user makes
    if mark:
        with open(os.path.join(staging, STAGING_MARKER), "w") as f:
            f.write(f"{os.getpid()}\n")
    return staging


def publish_output(staging: str, out: str) -> None:
    """Move a complete staging directory into place. An old output (replaced with --overwrite) is first renamed
    to a fresh, uniquely named sibling, so nothing but it is ever deleted, and it is put back if the move fails."""
    out = os.path.abspath(out)
    marker = os.path.join(staging, STAGING_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    while True:
        old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{os.getpid()}-{os.urandom(4).hex()}")
        if not os.path.lexists(old):
            break
    # SIGTERM (SystemExit under the converters) between the renames would leave the old output renamed aside and
    # nothing at `out`: it waits until both are done.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(old, out)
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    shutil.rmtree(old)


def discard_output(staging: str) -> None:
    """Remove a staging directory that prepare_output returned (never through a symlink)."""
    if os.path.isdir(staging) and not os.path.islink(staging):
        shutil.rmtree(staging, ignore_errors=True)


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint directory; a training save directory (`<trainer.dir>/checkpoints`) whose `latest` file names
    one; or a run directory (`trainer.dir`), whose checkpoints/latest is used. Anything else is returned as given
    (read_info then says what it is)."""
    root = Path(path)
    if (root / META_FILE).exists():
        return path
    for save_root in (root, root / "checkpoints"):
        latest = save_root / "latest"
        if latest.is_file():
            named = save_root / latest.read_text().strip()
            if not named.is_dir():
                raise CheckpointError(f"{latest} names {named.name}, which does not exist; pass a step directory "
                                      f"of {save_root}.")
            return str(named)
    return path
