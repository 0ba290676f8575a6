"""HF <-> megatron checkpoint conversion, streaming and shareable among processes.

Both directions walk the mapping table (models/qwen3_vl_moe/hf_mapping.py) one tensor at a time:

- hf_to_mcore: every tensor of the unsharded model (its layout taken from megatron's own sharded state dict of
  a meta-device model) is produced from its HF tensors while it is written; the processes split the tensors.
- mcore_to_hf: the HF tensors are planned into safetensors shards; each process builds its shards one at a time
  from regions read out of the checkpoint (whatever layout it was saved at).

Everything that can be checked is checked before anything is written, and the output is built in a staging
directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist

from qwenvl_mcore.checkpoint import locking, model_io
from qwenvl_mcore.checkpoint.dcp import Chunk, read_regions, tensor_metadata, write_chunks
from qwenvl_mcore.conversion import hf_io
from qwenvl_mcore.conversion.transforms import LayoutMismatch
from qwenvl_mcore.models.qwen3_vl_moe.config import (
    ModelConfigError,
    args_from_hf_config,
    load_hf_config,
    released_config_dict,
)
from qwenvl_mcore.models.qwen3_vl_moe.hf_mapping import Context, rules_for
from qwenvl_mcore.parallel.spawn import SIGTERM_EXIT_CODE, run_on_ranks, sigterm_as_exit

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
USER_ERRORS = (model_io.CheckpointError, hf_io.HFCheckpointError, ModelConfigError, LayoutMismatch,
               locking.LockHeld)


class ConversionError(ValueError):
    """Bad input for a conversion; the message names the problem."""


class UsageError(ConversionError):
    """The command asks for something this input cannot give (a LoRA checkpoint without --adapter-only or
    --merge-lora, or the reverse): exit 2, the message naming the flags."""


LORA_KIND = "lora"  # qwenvl_mcore/lora/training.py: KIND, the kind of a LoRA training checkpoint (adapters only)


def _check_args(procs, dtype) -> None:
    if type(procs) is not int or procs < 1:
        raise ConversionError(f"--procs {procs}: the number of processes must be at least 1.")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}.")


@contextlib.contextmanager
def _building(out: str, *, overwrite: bool, inputs):
    """Hold `out`'s lock (a second conversion to it is refused naming this one) and yield a fresh staging
    directory, published as `out` when the block completes and removed when it fails or is stopped (SIGTERM:
    the workers are stopped first, then exit 143). A staging directory left by a killed run is removed here."""
    with sigterm_as_exit(), locking.PathLock(locking.lock_path_for(out), target=out):
        staging = model_io.prepare_output(out, overwrite=overwrite, inputs=inputs)
        try:
            yield staging
        except BaseException:
            model_io.discard_output(staging)
            raise
        model_io.publish_output(staging, out)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def unsharded_layout(args, dtype: torch.dtype) -> list[model_io.StoredParam]:
    """Every parameter of the whole model at TP = EP = PP = 1 and where it is stored, from a meta-device build
    (needs megatron's parallel state at that layout, any data-parallel size)."""
    from qwenvl_mcore.models.qwen3_vl_moe.model import Qwen3VLMoeModel
    from qwenvl_mcore.parallel import ParallelLayout

    with torch.device("meta"):
        model = Qwen3VLMoeModel(args, ParallelLayout(), dtype=dtype, use_cpu_initialization=False,
                                perform_initialization=False)
    return model_io.unsharded_params(model)


def _split(items: list, sizes: list[int], parts: int) -> list[list]:
    """Greedy split into `parts` lists of similar total size (largest first); deterministic."""
    bins: list[list] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(items)), key=lambda i: -sizes[i]):
        j = load.index(min(load))
        bins[j].append(items[i])
        load[j] += sizes[i]
    return bins


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- HF -> megatron ------------------------------------------------------------------------------------------
def check_hf_checkpoint(hf_dir: str, args, config: dict) -> dict[str, hf_io.TensorInfo]:
    """Headers of every shard, checked against the config: no shard missing or truncated, no tensor missing or
    unknown, every shape the config implies (experts in either known layout). Reads no tensor data."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    infos = hf_io.scan_hf_dir(hf_dir)
    expected = {h for _, _, hs in rules_for(args) for h in hs}
    missing, unknown = sorted(expected - set(infos), key=_natural), sorted(set(infos) - expected, key=_natural)
    with torch.device("meta"):
        hf_model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**json.loads(json.dumps(config))))
    shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}  # experts in transformers-5 layout
    wrong = []
    for name in sorted(expected & set(infos), key=_natural):
        want, got = shapes[name], infos[name].shape
        ok = got == want or (".mlp.experts." in name and got == (want[0], want[2], want[1]))
        if not ok:
            wrong.append(f"{name}: file {list(got)}, config implies {list(want)}")
    if missing or unknown or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors the config needs are missing: {missing[:12]}")
        if unknown:
            parts.append(f"{len(unknown)} tensors are unknown to this model: {unknown[:12]}")
        if wrong:
            parts.append(f"{len(wrong)} tensors do not fit the config:\n    " + "\n    ".join(wrong[:12]))
        raise ConversionError(f"{hf_dir} does not match its config.json:\n  " + "\n  ".join(parts))
    return infos


def _hf_to_mcore_rank(rank: int, world: int, hf_dir: str, infos: dict[str, hf_io.TensorInfo], staging: str,
                      dtype_name: str | None, progress: bool):
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    config = load_hf_config(hf_dir)
    args = args_from_hf_config(config)
    source_dtype = infos[next(h for _, _, hs in rules_for(args) for h in hs)].dtype
    dtype = DTYPES[dtype_name] if dtype_name else source_dtype
    layout = unsharded_layout(args, dtype)
    rules = {m: (rule, hf) for rule, m, hf in rules_for(args)}
    uncovered = [p.name for p in layout if p.name not in rules]
    if uncovered:  # a model parameter the mapping table does not know: a bug, never silently skipped
        raise RuntimeError(f"no mapping for {uncovered}")
    mine = _split(layout, [p.chunk.nbytes for p in layout], world)[rank]
    reader = hf_io.SafetensorsReader(hf_dir, infos)
    ctx = Context(args)
    bar = _Progress(sum(p.chunk.nbytes for p in mine), f"hf2mcore (process 1 of {world})", progress and rank == 0)

    def producer(param: model_io.StoredParam):
        rule, hf_names = rules[param.name]
        chunk = param.chunk

        def produce() -> torch.Tensor:
            full = rule.to_mcore([reader.get(h) for h in hf_names], ctx)
            bar.update(chunk.nbytes)
            return full.to(chunk.dtype).reshape(chunk.sizes)

        return produce

    write_chunks(staging, [(p.chunk, producer(p)) for p in mine], common={},
                 process_group=dist.group.WORLD if world > 1 else None)
    bar.close()
    if rank == 0:
        model_io.write_info(staging, kind="converted", dtype=dtype, source=os.path.abspath(hf_dir))
        hf_out = os.path.join(staging, model_io.HF_SUBDIR)
        model_io.copy_hf_side_files(hf_dir, hf_out)
        _write_config(os.path.join(hf_out, "config.json"), config, dtype)
    return {"tensors": len(layout), "bytes": sum(p.chunk.nbytes for p in layout), "dtype": str(dtype)}


def _write_config(path: str, config: dict, dtype: torch.dtype) -> None:
    """config.json in the released spelling (read by transformers 4.57 and 5.x) recording `dtype`."""
    out = released_config_dict(config)
    out["text_config"]["dtype"] = str(dtype).removeprefix("torch.")
    out.pop("torch_dtype", None)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
        f.write("\n")


def hf_to_mcore(hf_dir: str, out: str, *, dtype: str | None = None, procs: int = 1, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Convert an HF Qwen3-VL MoE directory into a megatron checkpoint at `out` (see module docstring)."""
    _check_args(procs, dtype)
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf {hf_dir}: not a directory; pass the HF model directory.")
    model_io.check_output_apart(out, [hf_dir])
    config = load_hf_config(hf_dir)
    args = args_from_hf_config(config)
    infos = check_hf_checkpoint(hf_dir, args, config)
    with _building(out, overwrite=overwrite, inputs=[hf_dir]) as staging:
        result = run_on_ranks(_hf_to_mcore_rank, procs, hf_dir, infos, staging, dtype, progress)[0]
    return result


# -- megatron -> HF ------------------------------------------------------------------------------------------
def _export_plan(layout: list[model_io.StoredParam], stored: dict, rules: dict, ctx: Context,
                 out_dtype: torch.dtype | None):
    """(parameters with their stored dtype, {hf name: (shape, dtype)}): shapes from the transforms on meta tensors."""
    params, shapes = [], {}
    for p in layout:
        dtype = stored[p.chunk.key].properties.dtype
        p = model_io.StoredParam(p.name, Chunk(p.chunk.key, p.chunk.global_shape, dtype, p.chunk.offsets,
                                               p.chunk.sizes), p.shape)
        rule, hf_names = rules[p.name]
        for h, t in zip(hf_names, rule.to_hf(torch.empty(p.shape, dtype=dtype, device="meta"), ctx)):
            shapes[h] = (tuple(t.shape), out_dtype or dtype)
        params.append(p)
    return params, shapes


def _mcore_to_hf_rank(rank: int, world: int, ckpt_dir: str, config: dict, staging: str, out_dtype: str | None,
                      expert_layout: str, max_bytes: int, progress: bool, adjust=None):
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    args = args_from_hf_config(config)
    stored = tensor_metadata(ckpt_dir)
    ctx = Context(args, expert_layout=expert_layout)
    dtype = DTYPES[out_dtype] if out_dtype else None
    layout = unsharded_layout(args, torch.float32)
    try:
        model_io.check_fits(ckpt_dir, [p.chunk for p in layout])
    except model_io.CheckpointError as e:
        return {"error": str(e)}
    rules = {m: (rule, hf) for rule, m, hf in rules_for(args)}
    params, shapes = _export_plan(layout, stored, rules, ctx, dtype)
    names = sorted(shapes, key=_natural)
    size_of = {n: math.prod(shape) * dt.itemsize for n, (shape, dt) in shapes.items()}
    shards = hf_io.plan_shards([(n, size_of[n]) for n in names], max_bytes)
    by_hf = {h: p for p in params for h in rules[p.name][1]}
    mine = [i for i in range(len(shards)) if i % world == rank]
    total = sum(size_of[h] for i in mine for h in shards[i])
    bar = _Progress(total, f"mcore2hf (process 1 of {world})", progress and rank == 0)
    for i in mine:
        wanted = set(shards[i])
        needed = list({by_hf[h].name: by_hf[h] for h in wanted}.values())
        regions = read_regions(ckpt_dir, [(p.chunk.key, p.chunk.offsets, p.chunk.sizes, p.chunk.dtype)
                                          for p in needed])
        tensors = {}
        for p, region in zip(needed, regions):
            rule, hf_names = rules[p.name]
            for h, t in zip(hf_names, rule.to_hf(region.reshape(p.shape), ctx)):
                if h in wanted:
                    if adjust is not None:
                        t = adjust(h, t, expert_layout)
                    tensors[h] = t.to(shapes[h][1]).contiguous()
        hf_io.write_shard(os.path.join(staging, hf_io.shard_file_name(i, len(shards))), tensors)
        bar.update(sum(size_of[h] for h in wanted))
        del tensors, regions
    bar.close()
    if rank == 0:
        hf_io.write_index(staging, shards, sum(size_of.values()))
    return {"tensors": len(names), "shards": len(shards), "bytes": sum(size_of.values())}


def mcore_to_hf(mcore: str, out: str, *, config_dir: str | None = None, dtype: str | None = None,
                expert_layout: str = "released", max_shard_size: str | int = "5GB", procs: int = 1,
                overwrite: bool = False, progress: bool = True, adjust=None, also_reads=()) -> dict:
    """Export a megatron checkpoint (converted or saved by the trainer, any layout) to an HF directory.

    `adjust(hf_name, tensor, expert_layout) -> tensor`, picklable, changes each HF tensor before its cast to the
    output dtype (lora/export.py merges adapters with it); `also_reads`: more inputs the output must stay apart
    from."""
    from qwenvl_mcore.conversion.transforms import RELEASED, TRANSFORMERS5

    if expert_layout not in (RELEASED, TRANSFORMERS5):
        raise ConversionError(f"expert layout {expert_layout!r}: choose {RELEASED!r} or {TRANSFORMERS5!r}.")
    _check_args(procs, dtype)
    try:
        max_bytes = hf_io.parse_size(max_shard_size)
    except ValueError as e:
        raise ConversionError(f"--max-shard-size: {e}") from None
    model_io.check_output_apart(out, [mcore, config_dir, *also_reads])
    ckpt = model_io.resolve_checkpoint_dir(mcore)
    inputs = [mcore, ckpt, config_dir, *also_reads]
    model_io.check_output_apart(out, inputs)
    info = model_io.read_info(ckpt)
    if info.kind == LORA_KIND:
        raise UsageError(f"{ckpt} is a LoRA checkpoint: it holds adapters only, trained on a base it names. Export "
                         "it with --adapter-only (an HF PEFT adapter directory, for peft.PeftModel.from_pretrained "
                         "on the base) or --merge-lora (a full HF checkpoint: the base with the adapters merged).")
    tensor_metadata(ckpt)  # a refused pickle or a missing/truncated data file fails here, before any worker starts
    config = load_hf_config(config_dir or info.hf_dir)
    args_from_hf_config(config)  # a config we cannot build fails here
    with _building(out, overwrite=overwrite, inputs=inputs) as staging:
        results = run_on_ranks(_mcore_to_hf_rank, procs, ckpt, config, staging, dtype, expert_layout, max_bytes,
                               progress, adjust)
        if "error" in results[0]:
            raise model_io.CheckpointError(results[0]["error"])
        model_io.copy_hf_side_files(info.hf_dir, staging)
        out_dtype = DTYPES[dtype] if dtype else getattr(torch, info.dtype)
        _write_config(os.path.join(staging, "config.json"), config, out_dtype)
    return results[0]


def hf_to_hf(hf_dir: str, out: str, *, dtype: str | None = None, expert_layout: str = "released",
             max_shard_size: str | int = "5GB", overwrite: bool = False, adjust=None, also_reads=()) -> dict:
    """An HF directory (either expert layout) written again as an HF directory in `expert_layout`, one tensor at a
    time, `adjust(hf_name, tensor, expert_layout)` applied to each tensor before its cast to `dtype` (default: the
    stored one): what mcore2hf --merge-lora does when the LoRA run's base is an HF directory (lora/export.py)."""
    from qwenvl_mcore.conversion.live import expert_layout_of_dir
    from qwenvl_mcore.conversion.transforms import RELEASED, TRANSFORMERS5

    if expert_layout not in (RELEASED, TRANSFORMERS5):
        raise ConversionError(f"expert layout {expert_layout!r}: choose {RELEASED!r} or {TRANSFORMERS5!r}.")
    _check_args(1, dtype)
    try:
        max_bytes = hf_io.parse_size(max_shard_size)
    except ValueError as e:
        raise ConversionError(f"--max-shard-size: {e}") from None
    inputs = [hf_dir, *also_reads]
    model_io.check_output_apart(out, inputs)
    config = load_hf_config(hf_dir)
    args = args_from_hf_config(config)
    infos = check_hf_checkpoint(hf_dir, args, config)
    reader = hf_io.SafetensorsReader(hf_dir, infos)
    source_dtype = infos[next(iter(infos))].dtype
    out_dtype = DTYPES[dtype] if dtype else source_dtype
    in_ctx = Context(args, expert_layout=expert_layout_of_dir(args, infos))
    out_ctx = Context(args, expert_layout=expert_layout)
    rule_of, shapes = {}, {}
    for rule, _, hf_names in rules_for(args):
        meta = [torch.empty(infos[h].shape, dtype=infos[h].dtype, device="meta") for h in hf_names]
        for h, t in zip(hf_names, rule.to_hf(rule.to_mcore(meta, in_ctx), out_ctx)):
            rule_of[h], shapes[h] = (rule, hf_names), tuple(t.shape)
    names = sorted(shapes, key=_natural)
    size_of = {n: math.prod(shapes[n]) * out_dtype.itemsize for n in names}
    shards = hf_io.plan_shards([(n, size_of[n]) for n in names], max_bytes)
    with _building(out, overwrite=overwrite, inputs=inputs) as staging:
        for i, shard in enumerate(shards):
            tensors = {}
            for h in shard:
                rule, hf_names = rule_of[h]
                outs = dict(zip(hf_names, rule.to_hf(rule.to_mcore([reader.get(n) for n in hf_names], in_ctx),
                                                     out_ctx)))
                t = outs[h] if adjust is None else adjust(h, outs[h], expert_layout)
                tensors[h] = t.to(out_dtype).contiguous()
            hf_io.write_shard(os.path.join(staging, hf_io.shard_file_name(i, len(shards))), tensors)
        hf_io.write_index(staging, shards, sum(size_of.values()))
        model_io.copy_hf_side_files(hf_dir, staging)
        _write_config(os.path.join(staging, "config.json"), config, out_dtype)
    return {"tensors": len(names), "shards": len(shards), "bytes": sum(size_of.values())}


def run_cli(convert, **kwargs) -> int:
    """What both converter scripts do: run, print the result as one JSON line, or a clean error (exit 1; 2 for a
    UsageError; 143 when stopped by SIGTERM)."""
    start = time.time()
    try:
        result = convert(**kwargs)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConversionError, *USER_ERRORS, OSError) as e:  # OSError: e.g. an --out that cannot be made, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:
        if e.code != SIGTERM_EXIT_CODE:
            raise
        print(f"error: stopped by SIGTERM; nothing was written to {kwargs['out']} (run the command again)",
              file=sys.stderr)
        return SIGTERM_EXIT_CODE
    result.update(out=kwargs["out"], seconds=round(time.time() - start, 2))
    print(json.dumps(result))
    return 0
