"""checkpoint.async_save=true: megatron's asynchronous dist-checkpoint save (qwenvl_mcore/checkpoint/manager.py,
AsyncSaver), on the tiny debug model.

- 2 ranks (EP2 x DP2), checkpoint.every=2: the per-step losses, grad norms and LR are bit-identical to the same run
  saving synchronously, and so is every tensor of every checkpoint (model and Adam state); the async run's step-4
  checkpoint resumed gives the straight run's last steps bit for bit;
- `python -m qwenvl_mcore.train` in its own session, each write held in flight by the test hook
  (manager.HOLD_ENV): training goes on while a write is held and `latest` stays on the last complete checkpoint;
  SIGKILL to the trainer mid-write takes its writer with it and leaves `latest` there, and the same command started
  again resumes from it (retracing the killed run's losses bit for bit); SIGTERM to the group mid-write waits for the write (the run
  is still there, `latest` unmoved, until the write is released), then exits 143 with that checkpoint and the stop
  checkpoint complete. The writer process, signalled with the rest of the group, is what must survive a SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from qwenvl_mcore.checkpoint import dcp, manager
from qwenvl_mcore.testing.dist import run_on_ranks

from _async_save_checks import EVERY, RESUME_AT, STEPS, sync_vs_async

ROOT = Path(__file__).resolve().parents[2]


def all_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    meta = dcp.tensor_metadata(str(ckpt))
    requests = [(k, (0,) * len(m.size), tuple(m.size), m.properties.dtype) for k, m in meta.items()]
    return dict(zip(meta, dcp.read_regions(str(ckpt), requests)))


def test_async_saves_change_nothing_and_resume(tmp_path):
    out = run_on_ranks(sync_vs_async, 2, str(tmp_path))[0]
    assert out["sync_status"] == out["async_status"] == out["resumed_status"] == "completed"
    assert [r["step"] for r in out["async"]] == list(range(1, STEPS + 1))
    assert out["async"] == out["sync"]  # loss, grad norm, aux loss, LR: ==, not approximately
    assert out["resumed"] == out["sync"][RESUME_AT:]
    for step in range(EVERY, STEPS + 1, EVERY):
        name = f"step_{step:07d}"
        a, s = all_tensors(tmp_path / "async" / "checkpoints" / name), all_tensors(tmp_path / "sync" / "checkpoints" / name)
        assert a.keys() == s.keys() and any("optimizer" in k for k in a), sorted(a)[:5]
        assert [k for k in a if not torch.equal(a[k], s[k])] == [], name
        assert json.loads((tmp_path / "async" / "checkpoints" / name / "qwenvl_mcore.json").read_text())["step"] == step
    for mode in ("sync", "async"):
        root = tmp_path / mode / "checkpoints"
        assert (root / "latest").read_text().strip() == f"step_{STEPS:07d}"
        assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # nothing staged is left
        assert [p.name for p in root.glob("step_*/.write_results*")] == []


# -- a real run in its own session, signalled or killed mid-write ---------------------------------------------------
RUN = ["data.packing=false", "data.num_workers=0", "data.num_samples=8", "data.valid_samples=0",
       "data.global_batch_size=2", "data.seq_length=192", "optim.warmup_steps=1", "logging.progress_bar=false",
       "logging.tensorboard=false", "checkpoint.every=2", "checkpoint.keep=5", "checkpoint.async_save=true",
       "trainer.steps=12"]


def start(run_dir: Path, hold: Path | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(manager.HOLD_ENV, None)
    if hold is not None:
        hold.mkdir()
        env[manager.HOLD_ENV] = str(hold)
    return subprocess.Popen([sys.executable, "-m", "qwenvl_mcore.train", *RUN, f"trainer.dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: signalled as Slurm and torchrun do


def steps_logged(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip() and json.loads(line)["kind"] == "train"]


def wait_for(proc: subprocess.Popen, what, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not what():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) while waiting:\n{proc.stdout.read()[-4000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def latest(run_dir: Path) -> str | None:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else None


def test_sigkill_mid_write_resumes_from_the_last_complete_and_sigterm_waits_for_the_write(tmp_path):
    run_dir = tmp_path / "run"
    # 1. step 2's write released and published; step 4's held while training goes on; then SIGKILL to the group
    hold = tmp_path / "hold1"
    proc = start(run_dir, hold)
    wait_for(proc, lambda: (hold / "writing_2_0").exists())
    wait_for(proc, lambda: len(steps_logged(run_dir)) >= 3)  # step 3 trained while step 2 was being written
    assert latest(run_dir) is None
    (hold / "release_2").touch()
    wait_for(proc, lambda: latest(run_dir) == "step_0000002")
    wait_for(proc, lambda: (hold / "writing_4_0").exists() and len(steps_logged(run_dir)) >= 5)
    trainer = psutil.Process(proc.pid)
    writers = [c for c in trainer.children(recursive=True) if c.cmdline() == trainer.cmdline()]  # forked, not exec'd
    assert len(writers) == 1, writers  # the writer of step 4, held
    proc.kill()  # the trainer alone: its writer must not outlive it (it would hold the run's lock)
    proc.wait(timeout=60)
    psutil.wait_procs(writers, timeout=30)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in writers)
    killed = steps_logged(run_dir)
    assert latest(run_dir) == "step_0000002" and (run_dir / "checkpoints" / ".step_0000004.incomplete").is_dir()
    assert not (run_dir / "checkpoints" / "step_0000004").exists()

    # 2. the same command again: resumes from step 2 (the partial step 4 removed), step 4's write held, SIGTERM
    hold = tmp_path / "hold2"
    proc = start(run_dir, hold)
    wait_for(proc, lambda: (hold / "writing_4_0").exists() and len(steps_logged(run_dir)) >= len(killed) + 3)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(2)
    assert proc.poll() is None and latest(run_dir) == "step_0000002"  # the stop waits for the write in flight
    (hold / "release_all").touch()
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out[-4000:]
    resumed = steps_logged(run_dir)[len(killed):]
    assert resumed[0]["step"] == 3 and "from step 2 " in out and ".step_0000004.incomplete" in out, out[-4000:]
    # resumed from the last complete checkpoint: the killed run's steps 3.. retraced bit for bit
    common = min(len(killed), resumed[-1]["step"]) - 2
    assert common >= 3
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed[:common]] == [r[key] for r in killed[2:2 + common]], key
    stopped = resumed[-1]["step"]
    assert f"stopped by signal at step {stopped}" in out and latest(run_dir) == f"step_{stopped:07d}"
    root = run_dir / "checkpoints"
    for step in sorted({4, stopped}):
        ckpt = root / f"step_{step:07d}"
        assert {".metadata", "metadata.json", "qwenvl_mcore.json", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
        assert json.loads((ckpt / "qwenvl_mcore.json").read_text())["step"] == step
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
