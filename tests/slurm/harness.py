"""Cluster and reference-run helpers shared by the real-Slurm test modules (tests/slurm/conftest.py has the
fixtures)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from cluster import Cluster, ClusterError, processes_with_env
from jobs import ROOT, losses

# Why cgroup was not tested here, said again in the session's summary (a skip's reason is easy to miss).
CGROUP_SKIPPED: list[str] = []


def start_cluster(proctrack: str, root: Path, *, fallback: str | None = None):
    """A started cluster (generator for fixtures). Under proctrack/cgroup a cluster that cannot start or run
    `srun true` is recorded with Slurm's reason (CGROUP_SKIPPED) and replaced by a `fallback` cluster when one is
    named, else it is the one accepted skip; under linuxproc it fails the tests."""
    cluster = Cluster(root, proctrack)
    try:
        cluster.start()
        if proctrack == "cgroup":
            probe = subprocess.run(["srun", "--time=1", "true"], env=cluster.env(), capture_output=True, text=True,
                                   timeout=60)
            if probe.returncode != 0:
                raise ClusterError(f"`srun true` exited {probe.returncode}: {probe.stderr.strip()[-600:]}\n"
                                   f"{cluster.log_tails(8)}")
    except (ClusterError, subprocess.TimeoutExpired) as e:
        cluster.stop()
        if proctrack == "cgroup":
            reason = f"Slurm with ProctrackType=proctrack/cgroup (cgroup/v1) does not work: {e}"
            CGROUP_SKIPPED.append(reason.splitlines()[0])
            print(f"\n{reason}")
            if fallback is not None:
                print(f"[running under proctrack/{fallback} instead]")
                yield from start_cluster(fallback, root / fallback)
                return
            pytest.skip(reason)
        raise
    try:
        yield cluster
    finally:
        strays = cluster.stop()
        print(f"\n[{proctrack} cluster stopped{'; killed: ' + '; '.join(strays) if strays else ''}]")


class StepClock:
    """When each line of a growing metrics.jsonl first appeared: polled every 0.1 s by a thread while alive()
    and until stop()."""

    def __init__(self, metrics: Path, alive=lambda: True):
        self.metrics, self.alive, self.times = metrics, alive, []
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while self.alive() and not self._stopped.is_set():
            try:
                lines = self.metrics.read_bytes().count(b"\n")
            except OSError:
                lines = 0
            now = time.time()
            self.times.extend([now] * (lines - len(self.times)))
            time.sleep(0.1)


def pace_of(times: list[float], started: float, window: int = 6) -> tuple[float, float] | None:
    """(start-up s, s per step) of a run started at `started` whose steps ended at `times`, None with under 3.
    Seconds per step are the fastest mean over `window` consecutive steps (periodic checkpoints included): what
    the run did while it had the machine to itself. Start-up is taken as it was (a run that competed with
    another while starting errs late, which the scenario's margin for a late stop absorbs)."""
    if len(times) < 3:
        return None
    gaps = [b - a for a, b in zip(times, times[1:])]
    window = min(window, len(gaps))
    per_step = min(sum(gaps[i:i + window]) / window for i in range(len(gaps) - window + 1))
    return times[0] - started, per_step


class ReferenceRun:
    """`launch/local.sh --nproc 4` with the given overrides, started at once in the background; `losses()` waits
    for it and returns {step: loss}; `pace()` says how fast it went (start-up, seconds per step with its periodic
    checkpoints), which times the stops of the interrupted runs. Its processes carry a marker of their own and
    are killed by `stop()`."""

    DEFAULT_PACE = (25.0, 1.2)  # this 2-core machine, unloaded; used when the run was not timed (reused)

    def __init__(self, overrides: list[str], run_dir: Path, reuse: Path | None = None):
        if reuse is not None:  # a finished run: nothing to start
            self.run_dir, self.log, self.started, self._losses = reuse, reuse / "reference.log", time.time(), None
            self.marker = uuid.uuid4().hex
            self.proc, self.clock = subprocess.Popen(["true"]), None
            return
        self.run_dir = run_dir
        self.log = run_dir.parent / "reference.log"
        self.marker = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
        env.update(QW_SLURM_TEST_REFERENCE=self.marker, PYTHONUNBUFFERED="1")
        self.started = time.time()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", "launch/local.sh", "--nproc", "4", *overrides,
                                          f"trainer.dir={run_dir}"], cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._losses = None
        self.clock = StepClock(run_dir / "logs" / "metrics.jsonl", lambda: self.proc.poll() is None)

    def pace(self) -> tuple[float, float]:
        """(seconds from the start to the first step, seconds per step) of the finished run: see `pace_of`."""
        self.losses()
        return (self.clock and pace_of(self.clock.times, self.started)) or self.DEFAULT_PACE

    def losses(self, timeout: float = 600) -> dict[int, float]:
        if self._losses is None:
            rc = self.proc.wait(timeout=timeout)
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            assert rc == 0, f"the reference run (launch/local.sh) exited {rc}:\n{text[-4000:]}"
            per_step = losses(self.run_dir / "logs" / "metrics.jsonl")
            assert all(len(v) == 1 for v in per_step.values()), per_step
            self._losses = {step: v[0] for step, v in per_step.items()}
            print(f"\n[reference run: {len(self._losses)} steps in {time.time() - self.started:.0f}s]")
        return self._losses

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        procs = processes_with_env(lambda env: env.get("QW_SLURM_TEST_REFERENCE") == self.marker)
        for pid in procs:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
