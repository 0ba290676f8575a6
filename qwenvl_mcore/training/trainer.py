"""The SFT loop: build everything a run needs from its config, resume from `latest` when a checkpoint exists, train,
validate, log, checkpoint (every N steps, at the end, on SIGTERM/SIGUSR1, after too many bad steps).

Every rank runs this; the data position is global (`consumed_samples`), so a run resumes at any layout.
With `peft=lora` the base is frozen and only adapters train and are checkpointed (qwenvl_mcore/lora/training.py).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from omegaconf import DictConfig, OmegaConf

from qwenvl_mcore import library_noise
from qwenvl_mcore.checkpoint import manager, model_io
from qwenvl_mcore.data.build import datasets_from_config
from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.pipeline import BatchShape, RankStep, StepBatches, empty_microbatch, step_loader
from qwenvl_mcore.data.sampler import GlobalBatchSampler
from qwenvl_mcore.lora import adapter_dir
from qwenvl_mcore.lora import training as lora_training
from qwenvl_mcore.lora.config import LoRAConfigError
from qwenvl_mcore.models.qwen3_vl_moe.config import (
    args_from_hf_config,
    flavor_hf_config,
    load_hf_config,
    released_config_dict,
)
from qwenvl_mcore.models.qwen3_vl_moe.layout_checks import validate_layout
from qwenvl_mcore.models.qwen3_vl_moe.model import build_model_chunks, parameter_part
from qwenvl_mcore.parallel.distributed import init_distributed
from qwenvl_mcore.training import metrics as metrics_lib
from qwenvl_mcore.training.config import (
    ConfigError,
    config_notes,
    data_parallel_microbatches,
    layout_of,
    optim_settings_of,
)
from qwenvl_mcore.training.lora_sites import LoRAShape
from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches, unwrap
from qwenvl_mcore.training.setup import allocate_optimizer_state, build_optimizer, load_optimizer_state, wrap_ddp
from qwenvl_mcore.training.step import reduce_reports, train_step

# Exit statuses of a run, as the entry point returns them.
COMPLETED, PREEMPTED, BAD_STEPS = "completed", "preempted", "bad_steps"
# A run whose first steps hold no usable sample stops (DataError, exit 2) after this many, or sooner when it has read
# a whole epoch or reached trainer.steps: its data or data settings are wrong, and training on would change nothing.
NO_DATA_STEPS = 5
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # loads at any TP/PP/EP/DP layout
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps attempted (skipped ones included)
    consumed_samples: int = 0  # global data position: samples of all ranks so far
    skipped_steps: int = 0
    consecutive_skips: int = 0
    data_skips: dict = field(default_factory=dict)  # samples left out so far, by reason (data.sample.SKIP_REASONS)
    truncated_samples: int = 0  # cut to data.seq_length (data.overlong=truncate_text)
    empty_steps: int = 0  # steps without a loss token (every sample of the global batch skipped): nothing changed


@dataclass
class Run:
    cfg: DictConfig
    layout: object
    args: object
    chunks: list  # DDP-wrapped model chunks of this rank
    optimizer: object
    scheduler: object
    hf_dir: str  # config + processor files carried into every checkpoint
    processor: object
    pad_token_id: int
    state: TrainState
    lora_base: dict | None = None  # peft=lora: the frozen base's reference ({path, hash}); None: full training


# -- building ------------------------------------------------------------------------------------------------------
def model_source(cfg: DictConfig) -> tuple[object, model_io.InitSource | None]:
    """(model args, what model.init_from names or None). With model.init_from the architecture is the checkpoint's
    (its config.json; model.flavor is not used), so any Qwen3-VL MoE shape trains; without it, the flavor's."""
    if not cfg.model.init_from:
        return args_from_hf_config(flavor_hf_config(cfg.model.flavor)), None
    source = model_io.init_source(cfg.model.init_from)
    if source.kind == model_io.CHECKPOINT:
        lora_training.refuse_as_base(model_io.read_info(source.path))
    return args_from_hf_config(load_hf_config(source.hf_dir)), source


def _check_hf_source(source: model_io.InitSource, args) -> dict:
    """The HF directory's tensor headers, checked against its config (shards complete, no tensor missing or
    unknown, shapes in either expert layout) before anything is read; CheckpointError naming the problem."""
    from qwenvl_mcore.conversion.convert import ConversionError, check_hf_checkpoint
    from qwenvl_mcore.conversion.hf_io import HFCheckpointError

    try:
        return check_hf_checkpoint(source.path, args, load_hf_config(source.path))
    except (ConversionError, HFCheckpointError) as e:
        raise model_io.CheckpointError(f"model.init_from={source.path}: {e}") from None


def _prepare_hf_dir(cfg: DictConfig, args, source: model_io.InitSource | None, infos: dict | None = None) -> str:
    """The HF side files a checkpoint carries: a converted or training checkpoint's hf/; else <trainer.dir>/hf
    written once here: from an HF model directory its processor files and its config in the released spelling
    (what hf2mcore writes into a converted checkpoint's hf/), without model.init_from the flavor's config and the
    processor from data.processor or the tiny one."""
    if source is not None and source.kind == model_io.CHECKPOINT:
        return source.hf_dir
    out = os.path.join(cfg.trainer.dir, "hf")
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        if source is not None:
            from qwenvl_mcore.conversion.convert import _write_config

            model_io.copy_hf_side_files(source.path, out)
            _write_config(os.path.join(out, "config.json"), load_hf_config(source.path),
                          next(iter(infos.values())).dtype)
        else:
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(released_config_dict(args.hf_config), f, indent=2)
        if cfg.data.processor:
            model_io.copy_hf_side_files(cfg.data.processor, out)
        elif source is not None:
            pass
        elif cfg.model.flavor == "debug":
            from qwenvl_mcore.models.qwen3_vl_moe import debug_assets

            debug_assets.build_processor(debug_assets.build_tokenizer()).save_pretrained(out)
        else:
            raise ConfigError(f"model.flavor={cfg.model.flavor} without model.init_from needs data.processor=<dir with "
                              "the tokenizer and processor files> (or start from a checkpoint or HF directory).")
    dist.barrier()
    return out


def _load_processor(cfg: DictConfig, hf_dir: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(cfg.data.processor or hf_dir)


def _recompute_overrides(cfg: DictConfig) -> dict:
    if cfg.model.recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=cfg.model.recompute_num_layers)
    if cfg.model.recompute == "selective":
        return dict(recompute_granularity="selective")
    return {}


def freeze(chunks: list, cfg: DictConfig) -> dict[str, int]:
    """requires_grad=False on the frozen parts; returns the trainable parameter count per part on this rank."""
    frozen = {"vision": cfg.model.freeze_vision, "merger": cfg.model.freeze_merger,
              "language": cfg.model.freeze_language}
    trainable = {"vision": 0, "merger": 0, "language": 0}
    for c in chunks:
        for name, p in c.named_parameters():
            part = parameter_part(name)
            p.requires_grad_(not frozen[part])
            trainable[part] += p.numel() if p.requires_grad else 0
    return trainable


@dataclass
class RunStart:
    """What a run settles before it builds anything: the locks on its directories (held by rank 0 for the run's
    life), the checkpoint it resumes from and that checkpoint's step."""

    locks: list
    resume_from: str | None = None
    resume_step: int | None = None
    lora_base: dict | None = None  # peft=lora: the base's reference, checked against the resumed checkpoint's

    def release(self) -> None:
        for lock in self.locks:
            lock.release()


def start_run(cfg: DictConfig) -> RunStart:
    """Start the process group; rank 0 takes the run's lock (a second run on the same trainer.dir is refused
    naming the first), removes what killed saves left in checkpoint.dir and chooses the checkpoint to resume
    from. A refusal reaches every rank as the same error (ConfigError / CheckpointError: exit 2)."""
    init_distributed(layout_of(cfg), seed=cfg.trainer.seed)
    locks, outcome, original = [], None, None
    if dist.get_rank() == 0:
        try:
            locks = _lock_run_dirs(cfg)
            removed = manager.remove_stale_staging(cfg.checkpoint.dir)
            if removed:
                print(f"[train] removed what killed saves left in {cfg.checkpoint.dir}: {', '.join(removed)}",
                      flush=True)
            resume_from, resume_step = _choose_resume(cfg)
            outcome = (resume_from, resume_step, _check_lora(cfg, resume_from))
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            original = e
            known = isinstance(e, (ConfigError, model_io.CheckpointError))
            outcome = e if known else RuntimeError(f"rank 0 failed to start the run: {type(e).__name__}: {e}")
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    outcome = box[0]
    if isinstance(outcome, BaseException):
        for lock in locks:
            lock.release()
        raise original or outcome
    return RunStart(locks, *outcome)


def _check_lora(cfg: DictConfig, resume_from: str | None) -> dict | None:
    """peft=lora: the base's reference (model.init_from); with a checkpoint to resume, LoRA or not, that it fits
    the run (lora/training.py: check_resume), before anything is built. ConfigError otherwise."""
    lora = lora_training.lora_config(cfg)
    try:
        base = lora_training.base_reference(cfg.model.init_from) if lora.enabled else None
        if resume_from is not None:
            lora_training.check_resume(lora, _saved_training(resume_from), base, resume_from)
            if lora.init_from:
                print(f"[train] peft.init_from={lora.init_from} is ignored: resuming from {resume_from}, whose "
                      "adapters win.", flush=True)
        elif lora.init_from:
            adapter_dir.check_init_adapter(lora)
    except LoRAConfigError as e:
        raise ConfigError(str(e)) from None
    return base


def _lock_run_dirs(cfg: DictConfig) -> list:
    """Locks on trainer.dir, and on checkpoint.dir when it lies elsewhere (locking.lock_path_for: the same lock
    a converter writing there takes)."""
    from qwenvl_mcore.checkpoint import locking

    run_dir = os.path.abspath(cfg.trainer.dir)
    dirs = [run_dir]
    ckpt_dir = os.path.abspath(cfg.checkpoint.dir)
    if not ckpt_dir.startswith(run_dir.rstrip(os.sep) + os.sep):
        dirs.append(ckpt_dir)
    locks = []
    try:
        for d in dirs:
            locks.append(locking.PathLock(locking.lock_path_for(d), target=d).acquire())
    except locking.LockHeld as e:
        for lock in locks:
            lock.release()
        raise ConfigError(f"another run is using this run's directory: {e}") from None
    return locks


def verify_training_checkpoint(ckpt: str) -> int:
    """The step of training checkpoint `ckpt` after checking what can be checked without loading the tensors:
    its description, its metadata and data files (complete, through the pickle allow-list) and its common state.
    CheckpointError naming the file otherwise."""
    from qwenvl_mcore.checkpoint import dcp

    try:
        model_io.read_info(ckpt)
    except ValueError as e:  # CheckpointError, or a damaged qwenvl_mcore.json
        raise model_io.CheckpointError(f"{os.path.join(ckpt, model_io.META_FILE)}: {e}") from None
    dcp.read_metadata(ckpt)
    return int(_saved_training(ckpt)["trainer"]["step"])


def _saved_training(ckpt: str) -> dict:
    """The common "training" state of checkpoint `ckpt` (read through the pickle allow-list); CheckpointError when
    it has none."""
    from megatron.core import dist_checkpointing

    from qwenvl_mcore.checkpoint import safe_unpickle

    safe_unpickle.install()
    with safe_unpickle.checkpoint_errors(ckpt):
        common = dist_checkpointing.load_common_state_dict(ckpt)
    saved = common.get("training") if isinstance(common, dict) else None
    if saved is None:
        raise model_io.CheckpointError(f"{ckpt} holds no training state (a converted checkpoint?): start from it with "
                                       "model.init_from=... instead, or point checkpoint.dir elsewhere.")
    return saved


def _choose_resume(cfg: DictConfig) -> tuple[str | None, int | None]:
    """(checkpoint, step) to resume from: checkpoint.dir's latest, verified; when it is damaged, the newest intact
    step directory if checkpoint.fallback=true, else an error naming the damage and that override."""
    if not cfg.checkpoint.resume:
        return None, None
    save_root = cfg.checkpoint.dir
    try:
        latest = manager.latest_checkpoint(save_root)
        if latest is None:
            return None, None
        return latest, verify_training_checkpoint(latest)
    except model_io.CheckpointError as e:
        damage = e
    intact = None
    for name in reversed(manager.step_dirs(save_root)):
        try:
            intact = (os.path.join(save_root, name), verify_training_checkpoint(os.path.join(save_root, name)))
            break
        except model_io.CheckpointError:
            continue
    if not cfg.checkpoint.fallback:
        hint = (f" The newest intact checkpoint is {intact[0]} (step {intact[1]}): pass checkpoint.fallback=true to "
                "resume from it." if intact else
                " No other checkpoint there is intact: start afresh with checkpoint.resume=false (or another "
                "checkpoint.dir).")
        raise model_io.CheckpointError(f"cannot resume: {damage}{hint}")
    if intact is None:
        raise model_io.CheckpointError(f"cannot resume: {damage} checkpoint.fallback=true, but no other checkpoint in "
                                       f"{save_root} is intact: start afresh with checkpoint.resume=false.")
    print(f"[train] warning: {damage} checkpoint.fallback=true: resuming from {intact[0]} (step {intact[1]}).",
          flush=True)
    return intact


def build_run(cfg: DictConfig, start: RunStart) -> Run:
    """Everything the run needs (start_run has started the process group and chosen the checkpoint)."""
    layout = layout_of(cfg)
    args, source = model_source(cfg)
    validate_layout(args, layout, dist.get_world_size())
    hf_infos = _check_hf_source(source, args) if source is not None and source.kind == model_io.HF_MODEL else None
    hf_dir = _prepare_hf_dir(cfg, args, source, hf_infos)
    processor = _load_processor(cfg, hf_dir)
    if cfg.optim.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("optim.cpu_offload=true moves optimizer states from the GPU to the host: it needs a GPU; "
                          "set optim.cpu_offload=false.")
    chunks = build_model_chunks(args, layout, dtype=DTYPES[cfg.model.dtype], aux_loss_coeff=cfg.model.aux_loss_coeff,
                                loss_chunk_tokens=cfg.model.loss_chunk_tokens,
                                vision_microbatches=cfg.model.vision_microbatches,
                                **_recompute_overrides(cfg))
    resume_from = start.resume_from
    lora = lora_training.lora_config(cfg)
    if source is not None and (resume_from is None or lora.enabled):  # a LoRA checkpoint holds no base weights
        if source.kind == model_io.HF_MODEL:  # each rank streams its own shards' bytes (conversion/live.py)
            from qwenvl_mcore.conversion import live

            live.load_hf_dir(chunks, source.path, args, hf_infos)
        else:
            model_io.load_model(source.path, chunks)
    if lora.enabled:  # after the base is loaded, before DDP: only the adapters get gradient buffers and Adam state
        try:
            lora_training.prepare(chunks, lora)
            if lora.init_from and resume_from is None:  # checked by start_run; on resume the checkpoint wins
                adapter_dir.load_init_adapter(chunks, args, lora.init_from)
        except LoRAConfigError as e:
            raise ConfigError(str(e)) from None
    else:
        freeze(chunks, cfg)
        if any(sum(p.numel() for p in c.parameters() if p.requires_grad) == 0 for c in chunks):
            raise ConfigError("with these model.freeze_* settings a pipeline stage has no trainable parameters: "
                              "train the LLM (model.freeze_language=false) or use parallel.pp=1.")
    settings = optim_settings_of(cfg)
    lr_overrides = [(lambda n, part=part: parameter_part(n) == part, lr)
                    for part, lr in (("vision", cfg.optim.vision_lr), ("merger", cfg.optim.merger_lr)) if lr is not None]
    chunks = wrap_ddp(chunks, distributed_optimizer=settings.distributed_optimizer, grad_dtype=settings.grad_dtype)
    optimizer, scheduler = build_optimizer(chunks, settings, steps=cfg.trainer.steps, lr_overrides=lr_overrides)
    run = Run(cfg, layout, args, chunks, optimizer, scheduler, hf_dir, processor,
              processor.tokenizer.pad_token_id, TrainState(), lora_base=start.lora_base)
    if resume_from is not None:
        load_training_checkpoint(run, resume_from)
    return run


# -- checkpoints ---------------------------------------------------------------------------------------------------
def _rng_object(is_loading: bool = False) -> ShardedObject:
    state = None
    if not is_loading:
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                 "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
                 "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _sharded_training_state(run: Run, *, is_loading: bool, with_rng: bool) -> dict:
    state = model_io.model_sharded_state_dict([unwrap(c) for c in run.chunks])
    if run.lora_base is not None:  # the base is never saved: a resume loads it from model.init_from
        state = lora_training.adapter_state(state)
    state["optimizer"] = run.optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    if with_rng:
        state["rng_state"] = _rng_object(is_loading)
    return state


def hf_exporter(run: Run):
    """checkpoint.save_hf: the function that writes the run's model as HF safetensors into a checkpoint's hf/
    (conversion/live.py: gathered one parameter at a time, one writer per pipeline stage; released expert layout;
    config.json recording the weights' dtype; with peft=lora the adapters merged, W + scale * B @ A in fp32 as
    mcore2hf --merge-lora does). Collective."""
    from qwenvl_mcore.conversion import hf_io, live
    from qwenvl_mcore.conversion.convert import _write_config

    chunks = [unwrap(c) for c in run.chunks]
    dtype = DTYPES[run.cfg.model.dtype]
    max_bytes = hf_io.parse_size(run.cfg.checkpoint.hf_max_shard_size)

    def export(out: str) -> None:
        adjust = None
        if run.lora_base is not None:
            from qwenvl_mcore.lora.export import live_merger

            adjust = live_merger(chunks, run.args, lora_training.lora_config(run.cfg))
        live.write_hf_dir(chunks, run.args, out, max_shard_bytes=max_bytes, dtype=dtype, adjust=adjust)
        if dist.get_rank() == 0:
            _write_config(os.path.join(out, "config.json"), load_hf_config(run.hf_dir), dtype)

    return export


def save_training_checkpoint(run: Run, saver: manager.AsyncSaver | None = None, *, hf: bool = False) -> str:
    """Save the run's state as checkpoint.dir/step_<step>. With `saver` (checkpoint.async_save=true) the save is
    only started: `latest` moves when saver.poll/wait finalizes it, once every rank has written it. `hf`: the step
    directory's hf/ also gets the model as HF safetensors (checkpoint.save_hf), written before it is published."""
    allocate_optimizer_state(run.optimizer)  # before the first good step torch's Adam has no state to save
    state = _sharded_training_state(run, is_loading=False, with_rng=True)
    state["training"] = {
        "trainer": dataclasses.asdict(run.state), "scheduler": run.scheduler.state_dict(),
        "layout": run.layout.as_dict(), "world_size": dist.get_world_size(),
        "config": OmegaConf.to_container(run.cfg, resolve=True),
    }
    kind, info = "training", {}
    if run.lora_base is not None:
        state["training"]["lora"] = lora_training.checkpoint_record(lora_training.lora_config(run.cfg), run.lora_base)
        kind, info = lora_training.KIND, {"base": run.lora_base}
    save = saver.save if saver is not None else manager.save_checkpoint
    return save(run.cfg.checkpoint.dir, run.state.step, state, hf_dir=run.hf_dir, dtype=DTYPES[run.cfg.model.dtype],
                keep=run.cfg.checkpoint.keep, kind=kind, info=info,
                files={"config.yaml": OmegaConf.to_yaml(run.cfg, resolve=True)},
                hf_export=hf_exporter(run) if hf else None)


def load_training_checkpoint(run: Run, ckpt: str) -> None:
    """Model, optimizer (any layout), scheduler, data position; RNG states when the layout is unchanged."""
    from megatron.core import dist_checkpointing

    from qwenvl_mcore.checkpoint import safe_unpickle

    safe_unpickle.install()
    with safe_unpickle.checkpoint_errors(ckpt):
        common = dist_checkpointing.load_common_state_dict(ckpt)
    saved = common.get("training")
    if saved is None:
        raise model_io.CheckpointError(f"{ckpt} holds no training state (a converted checkpoint?): start from it with "
                                       "model.init_from=... instead, or point checkpoint.dir elsewhere.")
    # a layout saved before a field existed (first/last_stage_layers) holds its default
    saved_layout = {**dataclasses.asdict(type(run.layout)()), **saved["layout"]}
    same_layout = saved_layout == run.layout.as_dict() and saved["world_size"] == dist.get_world_size()
    allocate_optimizer_state(run.optimizer)
    state = _sharded_training_state(run, is_loading=True, with_rng=same_layout)
    refusal = None
    try:
        with safe_unpickle.checkpoint_errors(ckpt):
            loaded = dist_checkpointing.load(state, ckpt)
    except model_io.CheckpointError as e:
        refusal = str(e)
    # each rank reads its own objects (its RNG state): one refusing must stop every rank, not leave them waiting
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, refusal)
    refusal = next((r for r in everyone if r is not None), None)
    if refusal is not None:
        raise model_io.CheckpointError(refusal)
    chunks = [unwrap(c) for c in run.chunks]
    for i, chunk in enumerate(chunks):
        part = loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"]
        chunk.load_state_dict(part, strict=False)
    load_optimizer_state(run.optimizer, loaded["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.state = TrainState(**saved["trainer"])
    if same_layout:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


# -- data ----------------------------------------------------------------------------------------------------------
def build_datasets(run: Run):
    """(train, valid or None) as data.* describes them (data/build.py)."""
    return datasets_from_config(run.cfg.data, run.processor)


def batch_shape(run: Run) -> BatchShape:
    d = run.cfg.data
    return BatchShape.of(run.args, run.pad_token_id, seq_length=d.seq_length, packing=d.packing,
                         micro_batch_size=d.micro_batch_size, overlong=d.overlong)


def step_batches(run: Run, dataset, sampler: GlobalBatchSampler) -> StepBatches:
    return StepBatches(dataset, sampler, batch_shape(run), dp_rank=parallel_state.get_data_parallel_rank(),
                       dp_size=parallel_state.get_data_parallel_world_size(), tokenizer=run.processor.tokenizer)


def agreed_microbatches(run: Run, step: RankStep) -> list:
    """This rank's micro-batches filled with all-padding ones up to the largest count of any rank (at least one):
    expert and pipeline parallelism exchange tokens per micro-batch, so every rank must run the same number."""
    count = torch.tensor([max(len(step.microbatches), 1)], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return step.microbatches + [empty_microbatch(batch_shape(run))] * (int(count) - len(step.microbatches))


def account_data(run: Run, step: RankStep, writer) -> tuple[dict, list[int]]:
    """Add the samples every data-parallel rank left out of this step to the run's counts; rank 0 logs each one
    (console and logs/data_skips.jsonl). Returns this step's skip counts by reason and the dataset entries the
    data-parallel ranks were given, in rank order."""
    group = parallel_state.get_data_parallel_group()
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (step.skips, step.truncated, step.indices), group=group)
    skips = [s for rank_skips, _, _ in everyone for s in rank_skips]
    counts = Counter(reason for reason, _, _ in skips)
    for reason, n in counts.items():
        run.state.data_skips[reason] = run.state.data_skips.get(reason, 0) + n
    run.state.truncated_samples += sum(t for _, t, _ in everyone)
    if writer and skips:
        with open(os.path.join(run.cfg.logging.dir, "data_skips.jsonl"), "a") as f:
            for reason, location, detail in skips:
                f.write(json.dumps({"step": run.state.step + 1, "reason": reason, "location": location,
                                    "detail": detail}) + "\n")
                writer.message(f"[data] skipped {reason} at {location}: {detail}")
    return dict(counts), [i for _, _, indices in everyone for i in indices]


def _work_of(run: Run, step: RankStep) -> torch.Tensor:
    """[real tokens, model FLOPs] of this rank's samples (summed over DP by the caller); with peft=lora the FLOPs
    of a frozen base (no weight gradients) plus the adapters'."""
    lora = LoRAShape.of(run.cfg.peft)
    flops = metrics_lib.language_flops(run.args, step.lengths, lora=lora)
    if step.grids is not None:
        flops += metrics_lib.vision_flops(run.args, step.grids, vit_trains=not run.cfg.model.freeze_vision,
                                          merger_trains=not run.cfg.model.freeze_merger, lora=lora)
    return torch.tensor([sum(step.lengths), flops], dtype=torch.float64)


@torch.no_grad()
def evaluate(run: Run, dataset) -> dict:
    """Token-mean LM loss over data.valid_samples in order (eval_batches global batches, wrapping around)."""
    for c in run.chunks:
        c.eval()
    sampler = GlobalBatchSampler(len(dataset), run.cfg.data.global_batch_size, seed=0, shuffle=False)
    batches = step_batches(run, dataset, sampler)
    reports = []
    for b in range(run.cfg.trainer.eval_batches):
        micro = agreed_microbatches(run, batches[b * run.cfg.data.global_batch_size])
        reports += run_microbatches(run.chunks, micro, forward_only=True, loss_for=loss_for_per_token)
    total = reduce_reports(reports, ("loss_sum", "tokens"))
    for c in run.chunks:
        c.train()
    return {"loss": float(total[0] / total[1].clamp_min(1)), "tokens": int(total[1])}


# -- the loop ------------------------------------------------------------------------------------------------------
class StopSignal:
    """SIGTERM (Slurm pre-emption, time limit) or SIGUSR1 asks for a checkpoint and a clean stop, and so does the
    existence of `stop_file` (slurm/node.sh creates it: a file, unlike a signal, can neither be lost before the
    handlers exist nor arrive twice). Ranks agree on it after every step, since the request may reach them at
    different moments. Receiving it again changes nothing."""

    def __init__(self, early: list | None = None, stop_file: str | None = None):
        self.received = False
        self.early = early if early is not None else []  # signals recorded before the run was built (entry point)
        self.stop_file = stop_file
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame):
        self.received = True

    def asked(self) -> bool:
        """Whether this rank has been asked to stop (by a signal or the stop file)."""
        return self.received or bool(self.early) or bool(self.stop_file and os.path.exists(self.stop_file))

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.asked() else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(cfg: DictConfig, *, train_dataset=None, valid_dataset=None, early_signals: list | None = None,
          stop_file: str | None = None) -> str:
    """Run (or resume) the training run `cfg` on this rank; returns COMPLETED, PREEMPTED or BAD_STEPS.
    `train_dataset`/`valid_dataset` replace the configured data (tests, notebooks); `stop_file`: see StopSignal."""
    stop = StopSignal(early_signals, stop_file)
    start = start_run(cfg)
    if start.resume_step is not None and start.resume_step >= cfg.trainer.steps:
        start.release()
        stop.restore()
        if dist.get_rank() == 0:
            print(f"[train] {cfg.trainer.name} is complete: {start.resume_from} is at step {start.resume_step} "
                  f"(trainer.steps={cfg.trainer.steps}); nothing to do. Raise trainer.steps to train further.",
                  flush=True)
        return COMPLETED
    steps = writer = saver = None
    finished = False
    try:  # every way out releases the run's lock and closes the loader (its workers ignore SIGTERM: data/pipeline.py)
        run = build_run(cfg, start)
        saver = manager.AsyncSaver() if cfg.checkpoint.async_save else None
        train_ds, valid_ds = build_datasets(run)
        train_ds, valid_ds = train_dataset or train_ds, valid_dataset or valid_ds
        micro_per_rank = data_parallel_microbatches(cfg, parallel_state.get_data_parallel_world_size())
        sampler = GlobalBatchSampler(len(train_ds), cfg.data.global_batch_size, seed=cfg.data.seed,
                                     shuffle=cfg.data.shuffle)
        steps = step_loader(step_batches(run, train_ds, sampler), run.state.consumed_samples,
                            num_workers=cfg.data.num_workers, prefetch=cfg.data.prefetch)
        peak = metrics_lib.peak_tflops(cfg.logging.peak_tflops)
        if dist.get_rank() == 0:
            writer = metrics_lib.MetricsWriter(
                cfg.logging.dir, every=cfg.logging.every, progress_bar=cfg.logging.progress_bar,
                tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode, run_name=cfg.trainer.name,
                config=OmegaConf.to_container(cfg, resolve=True), start_step=run.state.step,
                total_steps=cfg.trainer.steps)
            library_noise.write_to(os.path.join(cfg.logging.dir, "library_warnings.log"))
            writer.message(f"[train] {cfg.trainer.name}: layout {run.layout.as_dict()} on {dist.get_world_size()} "
                           f"ranks, {cfg.data.global_batch_size} samples/step ("
                           + (f"packed into {cfg.data.seq_length}-token sequences" if cfg.data.packing else
                              f"{micro_per_rank} micro-batches/rank") + f", {len(train_ds)} per epoch), from step "
                           f"{run.state.step} (sample {run.state.consumed_samples}); checkpoints in "
                           f"{cfg.checkpoint.dir}")
            for note in config_notes(cfg):
                writer.message(f"[train] note: {note}")
        for c in run.chunks:
            c.train()
        status = COMPLETED
        while run.state.step < cfg.trainer.steps:
            status = _one_step(run, next(steps), sampler, writer, peak)
            if status == BAD_STEPS:
                break
            step = run.state.step
            if valid_ds is not None and cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                result = evaluate(run, valid_ds)
                if writer:
                    writer.log(step, result, kind="valid")
            if saver is not None:
                saver.poll()  # publishes the save in flight once every rank has written it
            if stop.agreed():
                status = PREEMPTED
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.trainer.steps:
                save_training_checkpoint(run, saver, hf=cfg.checkpoint.save_hf == "every")
        if saver is not None:
            saver.wait()  # a stop, too, lets the write in flight finish and publishes it before the last save
        hf = cfg.checkpoint.save_hf == "every" or (cfg.checkpoint.save_hf == "final" and status == COMPLETED)
        path = save_training_checkpoint(run, hf=hf)
        finished = True
        if writer:
            writer.message({COMPLETED: f"[train] done at step {run.state.step}; checkpoint {path}"
                                       + (f"; HF model {os.path.join(path, model_io.HF_SUBDIR)}" if hf else ""),
                            PREEMPTED: f"[train] stopped by signal at step {run.state.step}; checkpoint {path}; "
                                       "start the same command again to resume",
                            BAD_STEPS: f"[train] stopped: {cfg.trainer.max_consecutive_skips} steps in a row had a "
                                       f"non-finite loss or gradient (step {run.state.step}); the checkpoint {path} "
                                       "holds the last good weights. Check the data of those steps "
                                       "(logging.sample_ids=true lists them) or lower optim.lr."}[status])
    finally:
        if saver is not None and not finished:
            saver.abort()  # a failure on the way: the write in flight is never published
        if steps is not None:
            steps.close()
        stop.restore()
        start.release()
        if writer:
            writer.close()
    return status


def _no_usable_data(run: Run, sampler: GlobalBatchSampler) -> str:
    state = run.state
    read = (f"a whole epoch of {sampler.num_samples} entries" if state.consumed_samples >= sampler.num_samples else
            f"{state.consumed_samples} samples")
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(state.data_skips.items(), key=lambda kv: -kv[1]))
    steps = "step" if state.step == 1 else f"{state.step} steps"
    return (f"no usable sample in the first {steps} ({read}): every one was skipped ({reasons or 'none'}); "
            f"each is listed with its file and line in {os.path.join(run.cfg.logging.dir, 'data_skips.jsonl')}. "
            "Nothing was trained. Fix the data or its settings (`python tools/data/inspect.py <the same overrides> "
            "--summary` shows the skips), e.g. data.train, the media paths, data.seq_length.")


def _one_step(run: Run, data: RankStep, sampler: GlobalBatchSampler, writer, peak: float | None) -> str:
    cfg, state = run.cfg, run.state
    if data.consumed != state.consumed_samples:
        raise RuntimeError(f"data loader at sample {data.consumed}, run at {state.consumed_samples}")
    micro = agreed_microbatches(run, data)
    skipped_now, entries = account_data(run, data, writer)
    work = _work_of(run, data)
    dist.all_reduce(work, group=parallel_state.get_data_parallel_group())
    lr = run.optimizer.param_groups[0]["lr"]  # the LR this step uses
    start = time.perf_counter()
    result = train_step(run.chunks, run.optimizer, micro)
    if not (result.skipped or result.empty):
        run.scheduler.step(1)
    elapsed = time.perf_counter() - start
    state.step += 1
    state.consumed_samples += cfg.data.global_batch_size
    state.skipped_steps += int(result.skipped)
    state.empty_steps += int(result.empty)
    if not result.empty:  # an empty step says nothing about the loss: the count of non-finite steps goes on
        state.consecutive_skips = state.consecutive_skips + 1 if result.skipped else 0
    if writer:
        tflops = float(work[1]) / elapsed / dist.get_world_size() / 1e12
        m = {"loss": result.loss, "aux_loss": result.aux_loss, "total_loss": result.total_loss, "lr": lr,
             "grad_norm": result.grad_norm, "loss_tokens": result.tokens, "tokens": int(work[0]),
             "tokens_per_s": float(work[0]) / elapsed, "tflops_per_device": tflops,
             "mfu": tflops / peak if peak else None, "memory_gib": metrics_lib.memory_gib(),
             "step_time_s": elapsed, "skipped": result.skipped, "skipped_steps": state.skipped_steps,
             "consumed_samples": state.consumed_samples, "epoch": sampler.epoch(state.consumed_samples),
             "expert_load": result.expert_load, "microbatches": len(micro), "data_skips": dict(state.data_skips),
             "data_skips_step": skipped_now, "truncated_samples": state.truncated_samples,
             "empty": result.empty, "empty_steps": state.empty_steps}
        if result.empty:
            m.update(loss=None, total_loss=None, tokens_per_s=0.0, tflops_per_device=0.0, mfu=None)
        if cfg.logging.sample_ids:
            m["sample_ids"] = entries  # what the data-parallel ranks were handed, in rank order
        writer.log(state.step, m)
    if result.empty and state.empty_steps == state.step and (
            state.step >= NO_DATA_STEPS or state.consumed_samples >= sampler.num_samples
            or state.step >= cfg.trainer.steps):
        raise DataError(_no_usable_data(run, sampler))
    if state.consecutive_skips >= cfg.trainer.max_consecutive_skips:
        return BAD_STEPS
    return COMPLETED
