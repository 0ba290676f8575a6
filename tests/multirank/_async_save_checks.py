"""Rank function for tests/multirank/test_async_save.py: the same short run saved synchronously and with
checkpoint.async_save=true in one launch (2 gloo ranks, EP2 x DP2), then the async run's middle checkpoint resumed."""

from __future__ import annotations

import json
import os
import shutil

import torch.distributed as dist

from qwenvl_mcore.training import config, trainer

STEPS, EVERY, RESUME_AT = 6, 2, 4
COMMON = [
    "data.packing=false", "data.num_workers=0", "data.num_samples=8", "data.valid_samples=0",
    "data.global_batch_size=4", "data.seq_length=192", "parallel.ep=2",
    "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=1", f"optim.decay_steps={STEPS}",
    "optim.weight_decay=0.0", "model.aux_loss_coeff=0.1", "logging.progress_bar=false", "logging.tensorboard=false",
    f"checkpoint.every={EVERY}", "checkpoint.keep=5",
]


def records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "aux_loss", "lr")} for r in lines if r["kind"] == "train"]


def sync_vs_async(rank: int, world: int, work: str) -> dict:
    out = {}
    for mode in ("sync", "async"):
        run_dir = os.path.join(work, mode)
        cfg = config.compose([*COMMON, f"trainer.dir={run_dir}", f"trainer.steps={STEPS}",
                              f"checkpoint.async_save={mode == 'async'}"])
        out[f"{mode}_status"] = trainer.train(cfg)
        dist.barrier()
        if rank == 0:
            out[mode] = records(run_dir)
    # the async run's step RESUME_AT, alone in a fresh run directory, resumed to the end (synchronously)
    resumed = os.path.join(work, "resumed")
    if rank == 0:
        os.makedirs(os.path.join(resumed, "checkpoints"))
        name = f"step_{RESUME_AT:07d}"
        shutil.copytree(os.path.join(work, "async", "checkpoints", name), os.path.join(resumed, "checkpoints", name))
        with open(os.path.join(resumed, "checkpoints", "latest"), "w") as f:
            f.write(name + "\n")
    dist.barrier()
    out["resumed_status"] = trainer.train(config.compose([*COMMON, f"trainer.dir={resumed}",
                                                          f"trainer.steps={STEPS}"]))
    dist.barrier()
    if rank == 0:
        out["resumed"] = records(resumed)
    return out
