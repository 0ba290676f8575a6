"""Rank function for tests/multirank/test_lora_training.py: LoRA runs of the trainer (`peft=lora`) in one launch,
each `trainer.train` call in its own trainer.dir, returning numbers the tests assert on."""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from qwenvl_mcore.checkpoint import model_io
from qwenvl_mcore.models.qwen3_vl_moe.model import build_model_chunks
from qwenvl_mcore.testing.runs import refusal, train_keeping_run
from qwenvl_mcore.training import config, trainer
from qwenvl_mcore.training.schedule import unwrap

STEPS, RESUME_AT = 20, 12
INVARIANCE_STEPS = 10  # steps from the start compared with one rank
BF16_STEPS = 6
COMMON = [
    "peft=lora", "peft.rank=4", "peft.alpha=8.0",
    "data.packing=false", "data.num_workers=0", "data.num_samples=16", "data.valid_samples=0",
    "data.global_batch_size=4", "data.seq_length=192",
    "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=2", f"optim.decay_steps={STEPS}",
    "optim.weight_decay=0.0", "model.aux_loss_coeff=0.1", "logging.progress_bar=false", "logging.tensorboard=false",
    f"checkpoint.every={RESUME_AT}", "checkpoint.keep=5",
]


TP2_EP2 = ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"]
DP4 = ["parallel.tp=1", "parallel.ep=1", "parallel.sequence_parallel=false"]
PP2 = [*DP4, "parallel.pp=2"]  # x DP2


def compose(run_dir: str, base: str, steps: int = STEPS, extra=(), layout=TP2_EP2):
    return config.compose([*COMMON, *layout, f"model.init_from={base}", f"trainer.dir={run_dir}",
                           f"trainer.steps={steps}", *extra])


def records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "aux_loss", "lr")} for r in lines if r["kind"] == "train"]


def _copy_checkpoint(src_run: str, dst_run: str, step: int) -> None:
    """dst_run/checkpoints holds src_run's step `step` as its latest (rank 0; every rank waits)."""
    if dist.get_rank() == 0:
        root = os.path.join(dst_run, "checkpoints")
        os.makedirs(root)
        shutil.copytree(os.path.join(src_run, "checkpoints", f"step_{step:07d}"),
                        os.path.join(root, f"step_{step:07d}"))
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(f"step_{step:07d}\n")
    dist.barrier()


def _frozen_base(run, base: str) -> dict:
    """After training: the base against a fresh load of `base` (bit for bit), its dtype, and what holds a gradient
    buffer or optimizer state (megatron's distributed optimizer takes its parameters from the DDP buffers)."""
    fresh = build_model_chunks(run.args, run.layout, dtype=trainer.DTYPES[run.cfg.model.dtype],
                               aux_loss_coeff=run.cfg.model.aux_loss_coeff)
    model_io.load_model(base, fresh)
    out = {"n_base": 0, "base_changed": [], "base_dtypes": set(), "base_trainable": [], "buffered": [],
           "b_zero": []}
    for wrapped, ref in zip(run.chunks, fresh):
        want = dict(ref.named_parameters())
        for name, p in unwrap(wrapped).named_parameters():
            if getattr(p, "lora", False):
                if ".lora_B." in name and not bool(p.detach().abs().sum() > 0):
                    out["b_zero"].append(name)
                continue
            out["n_base"] += 1
            out["base_dtypes"].add(str(p.dtype))
            if not torch.equal(p.detach(), want[name].detach()):
                out["base_changed"].append(name)
            if p.requires_grad or getattr(p, "main_grad", None) is not None:
                out["base_trainable"].append(name)
        for buffer in [*wrapped.buffers, *wrapped.expert_parallel_buffers]:
            out["buffered"] += [getattr(p, "lora", False) for p in buffer.params]
    out["base_dtypes"] = sorted(out["base_dtypes"])
    return out


def lora_training_checks(rank: int, world: int, work: str, base: str, other_base: str) -> dict:
    out = {}
    straight = os.path.join(work, "straight")
    status, run = train_keeping_run(compose(straight, base))
    out["straight_status"] = status
    out.update(_frozen_base(run, base))
    del run
    out["straight"] = records(straight)

    # RESUME_AT's checkpoint copied into a fresh run; that run stopped after one step the way a pre-empted job is
    # (the stop file slurm/node.sh creates: checkpoint at the step reached, status preempted), then resumed to STEPS
    resumed = os.path.join(work, "resumed")
    _copy_checkpoint(straight, resumed, RESUME_AT)
    stop_file = os.path.join(work, "stop_now")
    if rank == 0:
        open(stop_file, "w").close()
    dist.barrier()
    out["stopped_status"] = trainer.train(compose(resumed, base), stop_file=stop_file)
    out["stopped_latest"] = open(os.path.join(resumed, "checkpoints", "latest")).read().strip()
    dist.barrier()
    out["resumed_status"] = trainer.train(compose(resumed, base))
    out["resumed"] = records(resumed)
    # the same checkpoint resumed at another layout (DP4: no TP, no EP, no SP)
    elsewhere = os.path.join(work, "resumed_dp4")
    _copy_checkpoint(straight, elsewhere, RESUME_AT)
    out["dp4_status"] = trainer.train(compose(elsewhere, base, layout=DP4))
    out["dp4"] = records(elsewhere)

    # refusals, each before any step
    for name, run_base, extra in (("other_base", other_base, []), ("full", base, []),
                                  ("rank", base, ["peft.rank=8"])):
        run_dir = os.path.join(work, f"refused_{name}")
        _copy_checkpoint(straight, run_dir, RESUME_AT)
        cfg = compose(run_dir, run_base, extra=extra)
        if name == "full":  # a full-training run pointed at a LoRA checkpoint.dir
            cfg.peft.method = "none"
        out[f"{name}_error"] = refusal(lambda: trainer.train(cfg))
        out[f"{name}_steps"] = len(records(run_dir))

    # layout invariance from the start: PP2 (x DP2), compared with one rank (single_rank_run) by the tests
    pp2 = os.path.join(work, "pp2")
    out["pp2_status"] = trainer.train(compose(pp2, base, steps=INVARIANCE_STEPS, layout=PP2))
    out["pp2"] = records(pp2)
    return out


def _masters(optimizer) -> tuple[list[str], int]:
    """dtypes and element count of the tensors the optimizer steps (megatron's fp32 master shards)."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    params = [p for o in opts for g in o.optimizer.param_groups for p in g["params"]]
    return sorted({str(p.dtype) for p in params}), sum(p.numel() for p in params)


def single_rank_run(rank: int, world: int, work: str, base: str) -> dict:
    """INVARIANCE_STEPS LoRA steps on one rank (the global batch as micro-batches): the invariance reference.
    Then BF16_STEPS steps with model.dtype=bf16: the frozen base in bf16, the optimizer's masters (fp32) and what
    they cover."""
    run_dir = os.path.join(work, "single")
    status = trainer.train(compose(run_dir, base, steps=INVARIANCE_STEPS, layout=DP4))
    out = {"status": status, "records": records(run_dir)}
    bf16_dir = os.path.join(work, "bf16")
    status, run = train_keeping_run(compose(bf16_dir, base, steps=BF16_STEPS, layout=DP4,
                                             extra=["model.dtype=bf16"]))
    adapters = [p for c in run.chunks for p in unwrap(c).parameters() if getattr(p, "lora", False)]
    out["bf16"] = {"status": status, "records": records(bf16_dir), **_frozen_base(run, base),
                   "adapter_dtypes": sorted({str(p.dtype) for p in adapters}),
                   "adapter_numel": sum(p.numel() for p in adapters)}
    out["bf16"]["master_dtypes"], out["bf16"]["master_numel"] = _masters(run.optimizer)
    return out
