"""Runs that fail while DataLoader workers run exit with their documented status, through launch/local.sh with
2 workers per rank (issue 16, items 1, 2 and 10; data.overlong=error takes the same path as data.strict=true, a
DataError raised in a worker). Before the fix each of them printed its error and then never
exited: the workers ignore SIGTERM (Slurm pre-emption) and multiprocessing's exit handler waited for them.

Each test starts one rank on the debug model, waits for the trainer's start line (printed just before the first
step), and requires the launcher to exit within 60 s of it with status 2, the message naming the file and line,
and no process of the run left behind."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
AFTER_START_S = 60


def _leftovers(marker: str) -> list[int]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("QW_TEST_MARKER") == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return found


def _kill_leftovers(marker: str) -> None:
    for pid in _leftovers(marker):
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def _describe(pid: int) -> str:
    try:
        return f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:150]}"
    except psutil.Error:
        return f"{pid}: (gone)"


def run_local(tmp_path: Path, *overrides: str) -> tuple[int, str, float]:
    """(status, output, seconds from the trainer's start line to the launcher's exit)."""
    log_path = tmp_path / "out.log"
    marker = uuid.uuid4().hex
    command = [str(ROOT / "launch" / "local.sh"), "--nproc", "1", "data.num_workers=2", "data.global_batch_size=2",
               "trainer.steps=3", "optim.warmup_steps=0", "logging.progress_bar=false", "logging.tensorboard=false",
               f"trainer.dir={tmp_path / 'run'}", *overrides]
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHON": sys.executable, "QW_TEST_MARKER": marker})
            deadline = time.time() + 300
            while "[train] " not in log_path.read_text() and proc.poll() is None:
                assert time.time() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.2)
            started = time.time()
            try:
                rc = proc.wait(timeout=AFTER_START_S + 5)
            except subprocess.TimeoutExpired:
                rc = None
            waited = time.time() - started
        left = _leftovers(marker)
    finally:
        _kill_leftovers(marker)
    out = log_path.read_text()
    assert rc is not None, f"still running {AFTER_START_S} s after the start line:\n{out[-4000:]}"
    assert not left, f"processes of the run left behind: {left}\n{out[-4000:]}"
    return rc, out, waited


def test_strict_mode_exits_2_naming_the_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("{bad\n{bad\n")
    rc, out, waited = run_local(tmp_path, f"data.train={data}", "data.strict=true")
    assert rc == 2, out[-4000:]
    assert waited < AFTER_START_S
    assert f"error: data.strict=true: bad_json at {data}:1: invalid JSON" in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]  # the message, not a worker traceback around it


def test_an_image_the_processor_refuses_exits_2_in_strict_mode(tmp_path):
    Image.new("RGB", (900, 4), (200, 10, 10)).save(tmp_path / "wide.png")  # aspect ratio 225 > 200
    data = tmp_path / "wide.jsonl"
    record = {"messages": [{"role": "user", "content": "<image>What is it?"},
                           {"role": "assistant", "content": "A line."}], "images": ["wide.png"]}
    data.write_text(json.dumps(record) + "\n")
    rc, out, waited = run_local(tmp_path, f"data.train={data}", "data.strict=true")
    assert rc == 2, out[-4000:]
    assert waited < AFTER_START_S
    assert f"error: data.strict=true: processor_error at {data}:1: ValueError: " in out, out[-4000:]
    assert "aspect ratio" in out and "wide.png" in out


def test_a_binary_file_as_data_exits_2_naming_the_skips(tmp_path):
    data = tmp_path / "model.jsonl"  # e.g. a checkpoint shard given as data by mistake
    rng = random.Random(0)
    data.write_bytes(b"\n".join(bytes(rng.randrange(128, 256) for _ in range(200)) for _ in range(6)) + b"\n")
    rc, out, waited = run_local(tmp_path, f"data.train={data}")
    assert rc == 2, out[-4000:]
    assert waited < AFTER_START_S
    assert "error: no usable sample in the first 3 steps (a whole epoch of 6 entries): every one was skipped " \
           "(6 bad_json)" in out, out[-4000:]
    assert "data_skips.jsonl" in out and "Nothing was trained" in out
    logged = [json.loads(line) for line in (tmp_path / "run" / "logs" / "data_skips.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and {r["reason"] for r in logged} == {"bad_json"}
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_a_killed_launcher_leaves_no_process(tmp_path):
    """SIGKILL to the node's launcher (what Slurm does at the end of a step; linuxproc tracking then loses whatever
    re-parented to init): torchrun, rank.py, the trainers and their DataLoader workers all go with it (issue 17)."""
    log_path = tmp_path / "out.log"
    marker = uuid.uuid4().hex
    command = [str(ROOT / "launch" / "local.sh"), "--nproc", "2", "data.num_workers=1", "data.global_batch_size=2",
               "trainer.steps=200", "logging.progress_bar=false", "logging.tensorboard=false",
               f"trainer.dir={tmp_path / 'run'}"]
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHON": sys.executable, "QW_TEST_MARKER": marker})
            deadline = time.time() + 300
            while "step 1 " not in log_path.read_text():
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.2)
            running = _leftovers(marker)
            proc.kill()
            proc.wait()
            deadline = time.time() + 20  # DataLoader workers notice a dead trainer within torch's 5 s check
            while _leftovers(marker) and time.time() < deadline:
                time.sleep(0.2)
            left = _leftovers(marker)
            described = [_describe(pid) for pid in left]
    finally:
        _kill_leftovers(marker)
    # node.sh, torchrun, 2 x (rank.py, trainer, worker) at least
    assert len(running) >= 8, running
    assert not left, described
