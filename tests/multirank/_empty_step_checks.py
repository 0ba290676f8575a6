"""Rank function for tests/multirank/test_empty_steps.py: runs with steps whose every sample is skipped."""

from __future__ import annotations

import json
import os
import traceback

from qwenvl_mcore.training import config, trainer

from _guard_checks import checkpoint_tensors, ckpt_dir, max_abs_diffs

COMMON = ["data.num_workers=0", "logging.progress_bar=false", "logging.tensorboard=false", "data.global_batch_size=2",
          "data.seq_length=128", "data.shuffle=false", "trainer.eval_every=0", "data.valid_samples=0",
          "optim.lr=3e-3", "optim.warmup_steps=0", "optim.schedule=cosine", "optim.min_lr=3e-4",
          "optim.decay_steps=10", "optim.weight_decay=0.1"]


def _record(role_text: list[tuple[str, str]]) -> str:
    return json.dumps({"messages": [{"role": r, "content": t} for r, t in role_text]})


def write_data(root: str) -> tuple[str, str]:
    """(mixed, all_bad): mixed holds two good text records then two bad lines, so with data.shuffle=false and two
    samples a step, steps 1 and 3 train and step 2 has no usable sample; all_bad holds only bad lines."""
    good = [_record([("user", f"What is {i} + {i}?"), ("assistant", f"It is {2 * i}.")]) for i in (1, 2)]
    mixed, all_bad = os.path.join(root, "mixed.jsonl"), os.path.join(root, "bad.jsonl")
    with open(mixed, "w") as f:
        f.write("\n".join([*good, "{bad", "not json"]) + "\n")
    with open(all_bad, "w") as f:
        f.write("{bad\n[1, 2]\n{bad\n")
    return mixed, all_bad


def empty_step_checks(rank: int, world: int, work: str) -> dict:
    from megatron.core import dist_checkpointing

    out = {}
    mixed, all_bad = write_data(work)
    run_dir = os.path.join(work, "mixed")
    cfg = config.compose([*COMMON, f"data.train={mixed}", f"trainer.dir={run_dir}", "trainer.steps=3",
                          "checkpoint.every=1", "checkpoint.keep=10"])
    out["status"] = trainer.train(cfg)
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        out["metrics"] = [json.loads(line) for line in f if line.strip()]
    tensors = {s: checkpoint_tensors(ckpt_dir(run_dir, s), model_only=False) for s in (1, 2, 3)}
    out["keys"] = len(tensors[1])
    out["across_empty"] = max_abs_diffs(tensors[1], tensors[2])
    out["across_good"] = max_abs_diffs(tensors[2], tensors[3])
    saved = {s: dist_checkpointing.load_common_state_dict(ckpt_dir(run_dir, s))["training"] for s in (1, 2, 3)}
    out["trainer_state"] = {s: saved[s]["trainer"] for s in saved}
    out["scheduler_steps"] = {s: saved[s]["scheduler"]["num_steps"] for s in saved}

    bad_dir = os.path.join(work, "bad")
    cfg = config.compose([*COMMON, f"data.train={all_bad}", f"trainer.dir={bad_dir}", "trainer.steps=20"])
    try:
        out["bad_status"] = trainer.train(cfg)
    except Exception as e:  # noqa: BLE001 - the test checks which one
        out["bad_error"] = (type(e).__name__, str(e), traceback.format_exc())
    out["bad_checkpoints"] = os.path.exists(os.path.join(bad_dir, "checkpoints"))
    return out
