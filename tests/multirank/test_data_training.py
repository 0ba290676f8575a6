"""Training on real files through the entry point: a dirty dataset in all four formats (messages, ShareGPT and
OpenAI JSONL, parquet with embedded images), packed into 640-token sequences, decoded by DataLoader workers.

- 20 steps at TP2 x EP2 (two data-parallel ranks) finish although about a fifth of the records are bad (corrupt and
  missing images, truncated and empty videos, bad JSON lines, tag mismatches, no assistant turn, over-long): the
  run stops at step 7 (mid-epoch) and resumes; the logged skip counts by reason, and the skip log's locations, are
  exactly the manifest's, once per epoch;
- across the two data-parallel ranks and the resume, every entry is handed out exactly once per epoch, in the
  sampler's order;
- packing does not change the language-model mathematics: the two-rank run's losses and gradient norms equal a
  one-rank run's (with the load-balancing loss off: its value depends on which samples share a micro-batch).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from qwenvl_mcore.data.sample_data import write_sample_dataset
from qwenvl_mcore.data.sampler import GlobalBatchSampler

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(tempfile.mkdtemp(prefix="qwenvl-data-training-"))
SEQ = 640  # bin size; the generator's over-long records are longer, every clean record shorter
BATCH, STEPS, STOP = 8, 20, 7
COMMON = [
    f"data.seq_length={SEQ}", f"data.global_batch_size={BATCH}", "data.packing=true",
    "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=3", f"optim.decay_steps={STEPS}",
    "optim.weight_decay=0.0", "logging.progress_bar=false", "logging.sample_ids=true", "logging.tensorboard=false",
    "trainer.eval_every=0", "checkpoint.every=0",
    # The load-balancing loss is transformers' per-micro-batch formula, and which samples share a packed micro-batch
    # depends on the data-parallel size; without it the objective does not depend on the layout.
    "model.aux_loss_coeff=0.0",
]


@functools.cache
def dataset() -> tuple[dict, list[str]]:
    """The dirty dataset: 76 generated records (5% dirty, at least one of each kind) + 4 over-long = 80 entries."""
    manifest = write_sample_dataset(WORK / "data", num_samples=76, seed=0, dirty_fraction=0.05, overlong_tokens=SEQ)
    files = [str(WORK / "data" / f) for f in manifest["files"]]
    return manifest, files


@functools.cache
def converted() -> Path:
    """One tiny checkpoint that every run starts from (random init differs between layouts)."""
    from qwenvl_mcore.conversion.convert import hf_to_mcore
    from qwenvl_mcore.testing import tiny

    hf = tiny.save_tiny_hf_checkpoint(WORK / "hf", seed=0)
    hf_to_mcore(str(hf), str(WORK / "mcore"), progress=False)
    return WORK / "mcore"


def expected_locations(manifest: dict) -> Counter:
    where = Counter()
    for bad in manifest["bad"]:
        path = WORK / "data" / bad["file"]
        where[(bad["reason"], f"{path}:{bad['line']}" if "line" in bad else f"{path}:row {bad['row']}")] += 1
    return where


def train(run_dir: Path, world: int, steps: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    _, files = dataset()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "qwenvl_mcore.train", *COMMON, f"data.train=[{','.join(files)}]", f"model.init_from={converted()}", f"trainer.dir={run_dir}",
           f"trainer.steps={steps}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    """The last record of every step (a resumed run appends)."""
    lines = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    by_step = {m["step"]: m for m in lines if m["kind"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


@functools.cache
def resumed_run() -> Path:
    """TP2 x EP2 with two workers per rank: 7 steps, then the same run continued to 20."""
    run_dir = WORK / "tp2_ep2"
    layout = ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true", "data.num_workers=2"]
    train(run_dir, 4, STOP, layout)
    assert (run_dir / "checkpoints" / "latest").exists()
    train(run_dir, 4, STEPS, layout)
    return run_dir


def test_dirty_dataset_trains_to_the_end_with_exact_skip_counts():
    manifest, _ = dataset()
    assert manifest["num_records"]["total"] == 80 and sum(manifest["expected_skips"].values()) >= 10
    steps = metrics(resumed_run())
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert not any(m["skipped"] for m in steps)
    epochs = STEPS * BATCH // 80  # 2: every bad entry is met exactly twice
    assert steps[-1]["data_skips"] == {r: epochs * n for r, n in manifest["expected_skips"].items()}
    per_step = Counter()
    for m in steps:
        per_step.update(m["data_skips_step"])
    assert dict(per_step) == steps[-1]["data_skips"]
    logged = [json.loads(line) for line in (resumed_run() / "logs" / "data_skips.jsonl").read_text().splitlines()]
    assert Counter((s["reason"], s["location"]) for s in logged) == \
        Counter({k: epochs * n for k, n in expected_locations(manifest).items()})
    # the first step of the resumed run continued the counts saved with the checkpoint
    assert steps[STOP]["data_skips"] == dict(Counter(steps[STOP - 1]["data_skips"]) +
                                             Counter(steps[STOP]["data_skips_step"]))
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_every_entry_once_per_epoch_across_ranks_and_resume():
    steps = metrics(resumed_run())
    handed = [i for m in steps for i in m["sample_ids"]]
    assert len(handed) == STEPS * BATCH
    sampler = GlobalBatchSampler(80, BATCH, seed=0)
    for epoch in range(STEPS * BATCH // 80):
        seen = handed[80 * epoch: 80 * (epoch + 1)]
        assert sorted(seen) == list(range(80)), f"epoch {epoch}"
        assert seen == sampler.epoch_order(epoch)
    assert handed[:80] != handed[80:]  # reshuffled


@pytest.mark.slow
def test_packed_training_does_not_depend_on_the_layout():
    single = WORK / "single"
    train(single, 1, STOP, ["data.num_workers=0"])
    ref, ours = metrics(single), metrics(resumed_run())[:STOP]
    for a, b in zip(ours, ref, strict=True):
        assert a["sample_ids"] == b["sample_ids"] and a["loss_tokens"] == b["loss_tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"], (a["step"], a["grad_norm"], b["grad_norm"])
