"""Rank functions for the trainer-guard tests (tests/multirank/test_trainer_guards.py): each launch runs several
short `trainer.train` calls in sequence (every one in its own trainer.dir) and returns numbers read from rank 0's
metrics.jsonl and from the saved checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import traceback
from collections import Counter

import torch

from qwenvl_mcore.checkpoint import dcp
from qwenvl_mcore.data.synthetic import SyntheticConversations
from qwenvl_mcore.testing import tiny
from qwenvl_mcore.training import config, trainer

COMMON = [
    "data.packing=false", "data.num_workers=0", "logging.progress_bar=false", "logging.tensorboard=false",
    "data.global_batch_size=4", "data.seq_length=192",
    "checkpoint.every=0", "trainer.eval_every=0", "data.valid_samples=0", "optim.lr=3e-3", "optim.warmup_steps=0",
    "optim.weight_decay=0.0",
]
MEDIA_KINDS = ("image", "video", "image_video")
# The distributed optimizer's tensors are stored as "chained_<i>.optimizer.state.<exp_avg|exp_avg_sq|param>.<name>".
OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


# -- helpers -------------------------------------------------------------------------------------------------------
def compose(run_dir: str, steps: int, num_samples: int, extra: list[str] = ()):
    return config.compose([*COMMON, f"trainer.dir={run_dir}", f"trainer.steps={steps}",
                           f"data.num_samples={num_samples}", *extra])


def processor():
    return tiny.build_processor(tiny.build_tokenizer())


class NaNMedia:
    """`base[order[i]]` for i in range(len(order)); samples at positions in `bad` get every pixel row (image and
    video) replaced by NaN, so their media embeddings, and through attention the loss, are NaN."""

    def __init__(self, base, bad=(), order=None):
        self.base, self.bad = base, set(bad)
        self.order = list(range(len(base))) if order is None else list(order)

    def __len__(self) -> int:
        return len(self.order)

    def has_media(self, i: int) -> bool:
        s = self.base[self.order[i]]
        return s.pixel_values is not None or s.pixel_values_videos is not None

    def __getitem__(self, i: int):
        s = self.base[self.order[i]]
        if i in self.bad:
            nan = {k: torch.full_like(v, float("nan")) for k in ("pixel_values", "pixel_values_videos")
                   if (v := getattr(s, k)) is not None}
            s = dataclasses.replace(s, **nan)
        return s


def train_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    keep = ("step", "loss", "aux_loss", "grad_norm", "lr", "skipped", "skipped_steps", "consumed_samples")
    return [{k: r[k] for k in keep} for r in records if r["kind"] == "train"]


def checkpoint_tensors(ckpt: str, *, model_only: bool) -> dict[str, torch.Tensor]:
    meta = dcp.tensor_metadata(ckpt)
    keys = sorted(k for k in meta if not (model_only and OPTIMIZER_KEY.match(k)))
    requests = [(k, (0,) * len(meta[k].size), tuple(meta[k].size), meta[k].properties.dtype) for k in keys]
    return dict(zip(keys, dcp.read_regions(ckpt, requests)))


def max_abs_diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per key of `a` (every one must be in `b` with the same shape): max |a - b|; inf for a shape mismatch, nan
    where either side holds a NaN."""
    out = {}
    for k, x in a.items():
        y = b[k]
        out[k] = float((x.double() - y.double()).abs().max()) if x.shape == y.shape else math.inf
    return out


def ckpt_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:07d}")


def checkpoint_listing(run_dir: str) -> dict:
    root = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        latest = f.read().strip()
    return {"steps": sorted(n for n in os.listdir(root) if n.startswith("step_")), "latest": latest}


# -- launch 1 (DP2): skipped steps, the consecutive-skip stop, freezing and per-part LRs ---------------------------
# Check 1: data.shuffle=false, 4 samples a step, so step k consumes positions [4(k-1), 4k) (rank 0 the first two).
SKIP_STEPS = 5
SKIP_BAD = (5, 14)  # a video sample of step 2 (on rank 0) and one of step 4 (on rank 1)
SKIPPED_STEPS = (2, 4)  # the steps holding them
SKIP_SAMPLES = 20
SKIP_EXTRA = ["data.shuffle=false", "optim.schedule=cosine", "optim.min_lr=3e-4", "optim.decay_steps=10",
              "model.aux_loss_coeff=0.1"]


def guard_checks(rank: int, world: int, work: str, init: str) -> dict:
    """Checks 1-3 and 5 (_checkpoint_checks.py) in one launch; a check that raises is returned as its traceback under "<check>_error" and the
    next one still runs (a failure on one rank only would leave the others waiting in a collective until gloo's
    timeout; the failures met so far happen on every rank at the same point)."""
    from _checkpoint_checks import checkpoint_checks  # it imports this module's helpers

    out = {"seconds": {}}
    for name, check in (("skip", _skip_check), ("stop", _stop_check), ("frozen", _frozen_check),
                        ("checkpoints", checkpoint_checks)):
        start = time.perf_counter()
        try:
            out.update(check(rank, work, init))
        except Exception:  # noqa: BLE001 - the test fails on it and shows the traceback
            out[f"{name}_error"] = traceback.format_exc()
        out["seconds"][name] = time.perf_counter() - start
    return out


def _skip_check(rank: int, work: str, init: str) -> dict:
    """1. Run A: NaN pixels in one sample of steps 2 and 4, a checkpoint after every step. Run B: the same data
    without the positions of A's steps 2 and 4 (A's steps 1, 3, 5 are B's 1, 2, 3): if a skipped step changes
    nothing (weights, Adam moments and step count, LR schedule), B retraces A exactly."""
    out = {}
    data = SyntheticConversations(processor(), SKIP_SAMPLES, seed=0)
    a_dir, b_dir = os.path.join(work, "skip_a"), os.path.join(work, "skip_b")
    bad = NaNMedia(data, bad=SKIP_BAD)
    cfg = compose(a_dir, SKIP_STEPS, SKIP_SAMPLES, [f"model.init_from={init}", "checkpoint.every=1",
                                                      "checkpoint.keep=10", *SKIP_EXTRA])
    out["skip_status"] = trainer.train(cfg, train_dataset=bad)
    dropped = {p for s in SKIPPED_STEPS for p in range(4 * (s - 1), 4 * s)}
    clean = NaNMedia(data, order=[i for i in range(SKIP_SAMPLES) if i not in dropped])
    cfg = compose(b_dir, SKIP_STEPS - len(SKIPPED_STEPS), len(clean), [f"model.init_from={init}", *SKIP_EXTRA])
    out["clean_status"] = trainer.train(cfg, train_dataset=clean)
    if rank != 0:
        return out
    out["skip_metrics"] = train_records(a_dir)
    out["clean_metrics"] = train_records(b_dir)
    out["skip_bad_have_media"] = [bad.has_media(i) for i in SKIP_BAD]
    out["skip_checkpoints"] = checkpoint_listing(a_dir)
    a = {s: checkpoint_tensors(ckpt_dir(a_dir, s), model_only=False) for s in range(1, SKIP_STEPS + 1)}
    b_final = checkpoint_tensors(ckpt_dir(b_dir, SKIP_STEPS - len(SKIPPED_STEPS)), model_only=False)
    out["skip_keys"] = {"a": sorted(a[SKIP_STEPS]), "b": sorted(b_final)}
    # every stored tensor (model and optimizer) across each skipped step, across the good steps after them, and
    # A's final state against B's
    out["across_skip"] = {s: max_abs_diffs(a[s - 1], a[s]) for s in SKIPPED_STEPS}
    good = [s for s in range(2, SKIP_STEPS + 1) if s not in SKIPPED_STEPS]
    out["across_good"] = {s: max_abs_diffs(a[s - 1], a[s]) for s in good}
    out["a_vs_b_final"] = max_abs_diffs(a[SKIP_STEPS], b_final)
    return out


def _stop_check(rank: int, work: str, init: str) -> dict:
    """2. Every sample NaN (media kinds only), at most 3 skipped steps in a row, 10 steps asked for."""
    out = {}
    stop_dir = os.path.join(work, "stop")
    base = SyntheticConversations(processor(), 16, seed=0, kinds=MEDIA_KINDS)
    all_bad = NaNMedia(base, bad=range(16))
    cfg = compose(stop_dir, 10, 16, [f"model.init_from={init}", "trainer.max_consecutive_skips=3"])
    out["stop_status"] = trainer.train(cfg, train_dataset=all_bad)
    if rank != 0:
        return out
    out["stop_metrics"] = train_records(stop_dir)
    out["stop_checkpoints"] = checkpoint_listing(stop_dir)
    out["stop_have_media"] = all(all_bad.has_media(i) for i in range(len(all_bad)))
    init_model = checkpoint_tensors(init, model_only=True)
    stopped = checkpoint_tensors(ckpt_dir(stop_dir, 3), model_only=True)
    out["stop_keys"] = {"init": sorted(init_model), "saved": sorted(stopped)}
    out["stop_vs_init"] = max_abs_diffs(init_model, stopped)
    return out


def _frozen_check(rank: int, work: str, init: str) -> dict:
    """3. Frozen ViT, merger at LR 0 (weight decay 0), 3 steps from the converted checkpoint; the trainable split
    that trainer.freeze returns is recorded."""
    out = {}
    frozen_dir = os.path.join(work, "frozen")
    splits = []
    original_freeze = trainer.freeze

    def recording_freeze(chunks, cfg):
        result = original_freeze(chunks, cfg)
        splits.append(dict(result))
        return result

    trainer.freeze = recording_freeze
    try:
        cfg = compose(frozen_dir, 3, 12, [f"model.init_from={init}", "model.freeze_vision=true",
                                          "optim.merger_lr=0.0"])
        out["frozen_status"] = trainer.train(cfg)
    finally:
        trainer.freeze = original_freeze
    out["frozen_trainable"] = splits
    if rank != 0:
        return out
    out["frozen_metrics"] = train_records(frozen_dir)
    init_model = checkpoint_tensors(init, model_only=True)
    final = checkpoint_tensors(ckpt_dir(frozen_dir, 3), model_only=False)
    out["frozen_vs_init"] = max_abs_diffs(init_model, final)
    out["frozen_numel"] = {k: v.numel() for k, v in init_model.items()}
    # Adam's first moment per parameter name: which parameters the optimizer holds, and nonzero where a parameter
    # got gradients (for the merger: its LR of 0 alone kept it still)
    out["frozen_exp_avg"] = {k.split(".optimizer.state.exp_avg.", 1)[1]: float(v.abs().max())
                             for k, v in final.items() if ".optimizer.state.exp_avg." in k}
    return out


# -- launch 2 (one rank): activation recompute ---------------------------------------------------------------------
RECOMPUTE_MODES = ("none", "full", "selective")


def recompute_checks(rank: int, world: int, work: str, init: str) -> dict:
    """Check 4: 3 steps at each model.recompute mode from the converted checkpoint; megatron's CheckpointFunction
    forward/backward calls are counted (and the checkpointed functions named) to show recompute really ran."""
    from megatron.core.tensor_parallel import random as mrandom

    out = {}
    calls: Counter = Counter()
    functions: set = set()
    fn_cls = mrandom.CheckpointFunction
    original_forward, original_backward = fn_cls.forward, fn_cls.backward

    def counting_forward(ctx, run_function, distribute_saved_activations, *args):
        calls["forward"] += 1
        functions.add(getattr(run_function, "__qualname__", repr(run_function)))
        return original_forward(ctx, run_function, distribute_saved_activations, *args)

    def counting_backward(ctx, *grads):
        calls["backward"] += 1
        return original_backward(ctx, *grads)

    fn_cls.forward, fn_cls.backward = staticmethod(counting_forward), staticmethod(counting_backward)
    try:
        for mode in RECOMPUTE_MODES:
            calls.clear()
            functions.clear()
            run_dir = os.path.join(work, f"recompute_{mode}")
            cfg = compose(run_dir, 3, 12, [f"model.init_from={init}", f"model.recompute={mode}",
                                           "model.aux_loss_coeff=0.1"])
            start = time.perf_counter()
            try:
                status = trainer.train(cfg)
                out[mode] = {"status": status, "metrics": train_records(run_dir)}
            except Exception:  # noqa: BLE001 - reported (and failed) by the test with the traceback
                out[mode] = {"status": "error", "error": traceback.format_exc()}
            out[mode].update(calls=dict(calls), functions=sorted(functions), seconds=time.perf_counter() - start)
    finally:
        fn_cls.forward, fn_cls.backward = staticmethod(original_forward), staticmethod(original_backward)
    return out
