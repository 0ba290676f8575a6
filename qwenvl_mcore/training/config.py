"""The typed schema of a training run and its composition from `conf/` with Hydra.

`conf/train.yaml` holds only a defaults list; every group file and every command-line override is merged onto
the dataclasses below (registered in Hydra's ConfigStore as `train_schema`), so an unknown or misspelled key, or
a value of the wrong type, stops the run before anything starts, naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from qwenvl_mcore.data.build import render_options
from qwenvl_mcore.data.mixing import dataset_specs
from qwenvl_mcore.lora.config import LoRAConfig, LoRAConfigError
from qwenvl_mcore.parallel.layout import ParallelLayout
from qwenvl_mcore.training.setup import GRAD_DTYPES, OptimSettings

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key and the fix."""


@dataclass
class ModelConf:
    flavor: str = "debug"  # debug | qwen3_vl_30b_a3b | qwen3_vl_235b_a22b
    # A converted checkpoint (tools/convert/hf2mcore.py), a training step/save directory, or an HF model directory
    # (config.json + safetensors, streamed in at start-up) whose weights start the run; the architecture is the
    # checkpoint's (flavor is then unused). None: random initialisation of the flavor.
    init_from: Optional[str] = None
    dtype: str = "fp32"  # fp32 | bf16: parameters and compute (the optimizer keeps fp32 master weights)
    aux_loss_coeff: Optional[float] = None  # None: text_config.router_aux_loss_coef
    freeze_vision: bool = False  # ViT patch/position embeddings and blocks
    freeze_merger: bool = False  # the merger and the DeepStack mergers
    freeze_language: bool = False  # token embeddings, decoder layers, final norm and LM head
    recompute: str = "none"  # none | selective (core attention) | full (whole layers)
    recompute_num_layers: int = 1  # full recompute: layers per checkpointed group (uniform)
    # Micro-batches whose images and videos the ViT encodes in one call, with one ViT backward per call (0: all of a
    # step's; 1: one call per micro-batch). Their ViT activations stay alive until that backward: the memory planner
    # counts them (tools/plan_memory.py). Context parallelism always runs the ViT per micro-batch.
    vision_microbatches: int = 0
    # At parallel.tp=1: the LM head + cross-entropy this many tokens at a time, never the whole micro-batch's logits
    # (384 x 151,936 fp32 logits: 223 MiB); 0: all logits at once (megatron's path, always used at tp > 1)
    loss_chunk_tokens: int = 384


# The parallel group mirrors ParallelLayout field for field (one source of truth); OmegaConf needs a mutable class.
ParallelConf = dataclasses.make_dataclass(
    "ParallelConf",
    [(f.name, typing.get_type_hints(ParallelLayout)[f.name], f.default) for f in dataclasses.fields(ParallelLayout)],
)


@dataclass
class OptimConf(OptimSettings):
    vision_lr: Optional[float] = None  # None: optim.lr (the schedule scales it like the main LR)
    merger_lr: Optional[float] = None


@dataclass
class DataConf:
    # Training files: a path (.jsonl: messages / ShareGPT / OpenAI formats, or .parquet), or a list of paths and
    # {path, weight, format, media_dir} mappings mixed by weight (docs/data.md). None: the synthetic dataset below.
    train: Optional[Any] = None
    valid: Optional[Any] = None  # same forms; None: data.valid_samples synthetic samples (with data.train unset)
    processor: Optional[str] = None  # directory with the tokenizer/processor files; default: the checkpoint's hf/
    # the synthetic dataset (data.train unset): deterministic multimodal conversations rendered by the processor
    num_samples: int = 64
    valid_samples: int = 16
    kinds: list[str] = field(default_factory=lambda: ["text", "image", "video", "image_video"])
    # batches
    seq_length: int = 256  # tokens per packed sequence (or per padded sample without packing)
    packing: bool = True  # first-fit packing of whole samples into seq_length bins, attention isolated per sample
    global_batch_size: int = 8  # samples (conversations) per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 1  # samples per micro-batch without packing; must be 1 with packing (one bin)
    seed: int = 0
    shuffle: bool = True
    overlong: str = "drop"  # a sample longer than seq_length: drop (counted) | truncate_text | error
    strict: bool = False  # a bad sample (corrupt media, bad JSON, ...) stops the run instead of being skipped
    num_workers: int = 2  # DataLoader worker processes per rank decoding media ahead of the model (0: inline)
    prefetch: int = 2  # steps each worker renders ahead
    # rendering: the model's chat template and processor
    train_on: str = "all"  # all | last: assistant turns whose tokens are trained
    system_prompt: Optional[str] = None  # system message for conversations that have none (None: add nothing)
    frames_fps: float = 2.0  # frame rate of videos given as a list of frame files, unless the record says
    image_min_pixels: Optional[int] = None  # per image; None: the processor's setting
    image_max_pixels: Optional[int] = None
    video_fps: Optional[float] = None  # frames sampled per second; None: the processor's (2 for Qwen3-VL)
    video_min_frames: Optional[int] = None
    video_max_frames: Optional[int] = None
    video_min_pixels: Optional[int] = None  # over all sampled frames of a video
    video_max_pixels: Optional[int] = None


@dataclass
class CheckpointConf:
    dir: str = "${trainer.dir}/checkpoints"
    every: int = 0  # save every N steps (0: only at the end, on SIGTERM and when stopping on bad steps)
    keep: int = 3  # newest step directories kept
    resume: bool = True  # continue from dir/latest when it exists
    fallback: bool = False  # latest damaged (truncated, garbage, refused): resume from the newest intact checkpoint
    async_save: bool = False  # periodic saves written by a forked process as training goes on (checkpoint/manager.py)
    # HF safetensors (released expert layout, index, config, processor files; LoRA merged) in <step dir>/hf:
    # none | every (each checkpoint) | final (the one written when the run reaches trainer.steps)
    save_hf: str = "none"
    hf_max_shard_size: str = "5GB"  # per safetensors file of save_hf (5GB, 500MB, 4GiB, or bytes)


@dataclass
class LoggingConf:
    dir: str = "${trainer.dir}/logs"
    every: int = 1  # console line and tensorboard/wandb points every N steps (metrics.jsonl gets every step)
    progress_bar: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "qwenvl-mcore"
    wandb_mode: str = "offline"  # offline | online
    peak_tflops: Optional[float] = None  # per device, for MFU; None: known GPUs (H100/H200/A100/B200), else no MFU
    sample_ids: bool = False  # write the dataset indices of every step to metrics.jsonl


@dataclass
class TrainerConf:
    name: str = "debug"
    dir: str = "runs/${trainer.name}"
    steps: int = 30
    seed: int = 1234
    eval_every: int = 0  # validation loss every N steps (0: never)
    eval_batches: int = 1  # global batches per validation
    max_consecutive_skips: int = 5  # non-finite loss/gradient steps in a row before the run stops


@dataclass
class TrainConfig:
    model: ModelConf = field(default_factory=ModelConf)
    parallel: ParallelConf = field(default_factory=ParallelConf)  # type: ignore[valid-type]
    optim: OptimConf = field(default_factory=OptimConf)
    data: DataConf = field(default_factory=DataConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    logging: LoggingConf = field(default_factory=LoggingConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    peft: LoRAConfig = field(default_factory=LoRAConfig)  # conf/peft/: none (full training) | lora


ConfigStore.instance().store(name="train_schema", node=TrainConfig)

_CHOICES = {
    "model.dtype": ("fp32", "bf16"),
    "model.recompute": ("none", "selective", "full"),
    "optim.schedule": ("cosine", "constant", "linear"),
    "optim.grad_dtype": GRAD_DTYPES,
    "data.overlong": ("drop", "truncate_text", "error"),
    "data.train_on": ("all", "last"),
    "logging.wandb_mode": ("offline", "online"),
    "checkpoint.save_hf": ("none", "every", "final"),
}


def compose(overrides: list[str] | tuple[str, ...] = (), *, config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra command-line `overrides`, validated against the schema."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e)) from None
    validate(cfg)
    return cfg


def _explain(error: BaseException) -> str:
    """Hydra's message plus its cause's (which names the key and what is wrong), without the advice to append."""
    lines = [str(error).split("\n")[0]]
    cause = error.__cause__ or error.__context__
    while cause is not None:
        first = str(cause).split("\n")[0]
        if first and first not in lines and "$VALUE" not in first:
            lines.append(first)
        cause = cause.__cause__ or cause.__context__
    return "configuration: " + ": ".join(lines) + " (see conf/ and qwenvl_mcore/training/config.py for the keys)"


def validate(cfg: DictConfig) -> None:
    """Checks the schema cannot express: choices, positive sizes, batch arithmetic, and no value left MISSING."""
    from omegaconf.errors import OmegaConfBaseException

    try:  # keys added with Hydra's `+key=value` bypass the struct check; a fresh schema catches them
        schema = OmegaConf.structured(TrainConfig)
        OmegaConf.set_struct(schema, True)
        OmegaConf.merge(schema, OmegaConf.to_container(cfg))
    except OmegaConfBaseException as e:
        raise ConfigError(f"configuration: {str(e).splitlines()[0]}") from None
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"configuration: no value for {', '.join(sorted(missing))}; set it on the command line.")
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(choices)}.")
    _check_numbers(cfg)
    try:
        from qwenvl_mcore.conversion.hf_io import parse_size

        parse_size(cfg.checkpoint.hf_max_shard_size)
    except ValueError as e:
        raise ConfigError(f"checkpoint.hf_max_shard_size: {e}") from None
    if cfg.data.packing and cfg.data.micro_batch_size != 1:
        raise ConfigError(f"data.packing=true makes each micro-batch one packed sequence of data.seq_length tokens: "
                          f"set data.micro_batch_size=1 (got {cfg.data.micro_batch_size}) or data.packing=false.")
    for key in ("train", "valid"):
        try:
            dataset_specs(OmegaConf.to_container(cfg.data)[key], f"data.{key}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:  # pixel budgets, frame counts, video_fps, train_on: checked now, not when the first worker renders
        render_options(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.global_batch_size % cfg.data.micro_batch_size:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not a multiple of data.micro_batch_size="
            f"{cfg.data.micro_batch_size}.")
    try:
        layout_of(cfg).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        lora = LoRAConfig(**OmegaConf.to_container(cfg.peft))
        lora.validate()
    except LoRAConfigError as e:
        raise ConfigError(str(e)) from None
    if lora.enabled:
        _check_lora(cfg, lora)
    if cfg.model.freeze_vision and cfg.model.freeze_merger and cfg.model.freeze_language:
        raise ConfigError("model.freeze_vision, freeze_merger and freeze_language are all true: nothing would train.")


def _check_lora(cfg: DictConfig, lora: LoRAConfig) -> None:
    """peft=lora trains adapters on a frozen base (qwenvl_mcore/lora/training.py): the base must be given, and the
    model.freeze_* switches, which choose what full training trains, have no meaning there."""
    if not cfg.model.init_from:
        raise ConfigError("peft=lora trains adapters on a frozen base: set model.init_from=<an HF model directory, a "
                          "converted checkpoint (tools/convert/hf2mcore.py) or a training checkpoint>.")
    frozen = [k for k in ("freeze_vision", "freeze_merger", "freeze_language") if cfg.model[k]]
    if frozen:
        raise ConfigError(f"model.{frozen[0]}=true with peft=lora: the base is frozen whole and peft.targets choose "
                          f"what trains (now {list(lora.targets)}); drop model.freeze_* and name the targets.")
    if lora.dropout > 0 and cfg.parallel.tp > 1:
        raise ConfigError(f"peft.dropout={lora.dropout} needs parallel.tp=1 for now (one dropout mask across TP ranks "
                          "is not guaranteed); set peft.dropout=0.")


# Numeric keys and what they must be: at least 1 (counts), at least 0 (0 meaning "off" or "none"), or, for floats,
# finite and non-negative / positive. Each message says what the value means, so the fix is clear.
_AT_LEAST_1 = ("trainer.steps", "data.num_samples", "data.seq_length", "data.global_batch_size",
               "data.micro_batch_size", "checkpoint.keep", "logging.every", "trainer.max_consecutive_skips",
               "trainer.eval_batches", "model.recompute_num_layers", "data.prefetch")
_AT_LEAST_0 = {"checkpoint.every": "0 saves only at the end", "trainer.eval_every": "0 never validates",
               "data.valid_samples": "0: no synthetic validation set", "data.num_workers": "0 renders in the trainer",
               "optim.warmup_steps": "0: no warmup", "data.seed": "numpy seeds are non-negative",
               "trainer.seed": "numpy seeds are non-negative",
               "model.vision_microbatches": "0 encodes all micro-batches of a step in one ViT call",
               "model.loss_chunk_tokens": "tokens per LM-head chunk; 0: the whole micro-batch's logits at once"}
_NON_NEGATIVE_FLOATS = ("optim.lr", "optim.min_lr", "optim.weight_decay", "optim.clip_grad", "optim.vision_lr",
                        "optim.merger_lr", "model.aux_loss_coeff")
_POSITIVE_FLOATS = ("optim.adam_eps", "data.frames_fps", "logging.peak_tflops")


def _check_numbers(cfg: DictConfig) -> None:
    """Counts, rates and learning rates that cannot work (negative, zero where it means nothing, NaN/inf)."""
    import math

    for key in _AT_LEAST_1:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be at least 1.")
    for key, meaning in _AT_LEAST_0.items():
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be 0 or more ({meaning}).")
    for key in _NON_NEGATIVE_FLOATS + _POSITIVE_FLOATS:
        value = OmegaConf.select(cfg, key)
        if value is None:  # optional keys: unset means "the default"
            continue
        positive = key in _POSITIVE_FLOATS
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ConfigError(f"{key}={value}: must be a finite number {'above 0' if positive else '>= 0'}.")
    for key in ("optim.adam_beta1", "optim.adam_beta2"):
        value = OmegaConf.select(cfg, key)
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value}: Adam's betas lie in [0, 1) (typical: 0.9 and 0.95).")
    o = cfg.optim
    if o.grad_dtype == "bf16" and cfg.model.dtype != "bf16":
        raise ConfigError(f"optim.grad_dtype=bf16 keeps gradients in the parameters' dtype, and with model.dtype="
                          f"{cfg.model.dtype} that is {cfg.model.dtype}: set model.dtype=bf16, or optim.grad_dtype=fp32.")
    if o.schedule != "constant" and o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}: the schedule decays from optim.lr to "
                          "optim.min_lr; lower optim.min_lr.")
    if o.decay_steps is not None:
        if o.decay_steps < 1:
            raise ConfigError(f"optim.decay_steps={o.decay_steps}: must be at least 1, or null (the run's "
                              "trainer.steps).")
        if o.warmup_steps >= o.decay_steps:
            raise ConfigError(f"optim.warmup_steps={o.warmup_steps} is not shorter than optim.decay_steps="
                              f"{o.decay_steps}: the schedule warms up, then decays; lower optim.warmup_steps or "
                              "raise optim.decay_steps.")


def config_notes(cfg: DictConfig) -> list[str]:
    """Settings that are valid but probably not meant, for the run's start-up message. A warmup longer than the run
    is one: it is not an error, so that a short test run (trainer.steps=3) of a preset keeps working."""
    notes = []
    if cfg.optim.warmup_steps >= cfg.trainer.steps:
        notes.append(f"optim.warmup_steps={cfg.optim.warmup_steps} is not shorter than the run (trainer.steps="
                     f"{cfg.trainer.steps}): the LR stays in warmup and never reaches optim.lr={cfg.optim.lr}; "
                     f"set optim.warmup_steps below {cfg.trainer.steps} (e.g. optim.warmup_steps=0) to train at it.")
    return notes


def layout_of(cfg: DictConfig) -> ParallelLayout:
    return ParallelLayout(**OmegaConf.to_container(cfg.parallel))


def optim_settings_of(cfg: DictConfig) -> OptimConf:
    return OptimConf(**OmegaConf.to_container(cfg.optim))


def data_parallel_microbatches(cfg: DictConfig, dp: int) -> int:
    """Micro-batches per rank and step: global batch / (micro batch x data-parallel size); a clear error otherwise."""
    per_step = cfg.data.micro_batch_size * dp
    if cfg.data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} must be a multiple of data.micro_batch_size x "
            f"data-parallel size = {cfg.data.micro_batch_size} x {dp}: change the batch sizes or the layout.")
    return cfg.data.global_batch_size // per_step


__all__ = ["ConfigError", "TrainConfig", "compose", "config_notes", "validate", "layout_of", "optim_settings_of",
           "data_parallel_microbatches"]
