"""Submitting and watching jobs on a test cluster (tests/slurm/cluster.py), and the processes a job leaves behind."""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

from cluster import MARKER, Cluster, _alive, kill_and_wait, processes_with_env

ROOT = Path(__file__).resolve().parents[2]  # the checkout: jobs are submitted from here, as the README says

# What makes launch/sft_moe.sh run on a node without GPUs: `--gpus-per-node=0` replaces the script's
# `#SBATCH --gpus-per-node=8` (which such a node refuses: "Invalid generic resource (gres) specification"; `--gres=none`
# or `--gpus=0` do not replace it), and GPUS_PER_NODE sets the ranks per node (else 8 start).
CPU_NODE = ["--gpus-per-node=0"]


def run(cluster: Cluster, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """A Slurm client command against `cluster`; with `check`, a failure raises with its stderr."""
    proc = subprocess.run(list(argv), cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def sbatch(cluster: Cluster, *args: str, env: dict | None = None) -> int:
    """Submit from the checkout's root (`args`: sbatch options, the script, its arguments); returns the job id.
    `env` entries are exported to the job on top of this process's environment (`--export=ALL,...` semantics)."""
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=cluster.env(**(env or {})),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch {' '.join(args)}: {proc.stderr.strip()}"
    return int(proc.stdout.strip().split(";")[0])


def job_info(cluster: Cluster, job_id: int) -> dict:
    """The fields of `scontrol show job` that the tests read: JobState, Reason, Restarts, ExitCode, StartTime,
    EndTime, Partition (strings; {} once Slurm has forgotten the job)."""
    proc = run(cluster, "scontrol", "-o", "show", "job", str(job_id), check=False)
    if proc.returncode != 0:
        return {}
    return {k: v for k, v in re.findall(r"\b(JobState|Reason|Restarts|ExitCode|StartTime|EndTime|Partition)=(\S*)",
                                        proc.stdout)}


def job_time(value: str) -> float:
    """Epoch seconds of a Slurm timestamp (2026-12-02T16:09:44)."""
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def wait_for(ready, timeout: float, what: str, interval: float = 0.2, log: Path | None = None):
    """Poll `ready()` until it returns something truthy (returned); AssertionError after `timeout` seconds, with the
    tail of `log` when given."""
    deadline = time.time() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.time() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        time.sleep(interval)


def job_processes(cluster: Cluster, job_id: int, run_dir: Path | None = None, *,
                  restarts: int | None = None) -> dict[int, str]:
    """{pid: command line} of the processes of job `job_id` on `cluster`: SLURM_JOB_ID in their environment (the
    batch script, srun, node.sh, torchrun, trainers and their helpers all inherit it), or `run_dir` (unique to the
    run) on their command line. `restarts`: only those of that attempt (SLURM_RESTART_COUNT, unset in the first),
    and not by command line (the next attempt's trainers have the same). Slurm's slurmstepd is not a job process."""
    root = str(cluster.root)

    def of_job(env):
        return (env.get("SLURM_JOB_ID") == str(job_id) and env.get(MARKER) == root
                and (restarts is None or env.get("SLURM_RESTART_COUNT", "0") == str(restarts)))

    found = processes_with_env(of_job)
    if run_dir is not None and restarts is None:
        needle = str(run_dir)
        found.update({pid: cmd for pid, cmd in processes_with_env(lambda env: True).items() if needle in cmd})
    return {pid: cmd for pid, cmd in found.items() if not cmd.startswith("slurmstepd")}


def leftover_processes(cluster: Cluster, job_id: int, run_dir: Path | None = None, *, restarts: int | None = None,
                       wait: float = 10.0) -> list[str]:
    """The job's processes (see job_processes) still running after up to `wait` s (polled: [] as soon as none
    is). Those found are killed, so that one failure does not spill into the next test."""
    deadline = time.time() + wait
    procs = job_processes(cluster, job_id, run_dir, restarts=restarts)
    while procs and time.time() < deadline:
        time.sleep(0.25)
        procs = job_processes(cluster, job_id, run_dir, restarts=restarts)
    if procs:
        kill_and_wait([p for p in procs if _alive(p)])
    return [f"{pid}: {cmd}" for pid, cmd in sorted(procs.items())]


def losses(metrics: Path) -> dict[int, list[float]]:
    """{step: [loss of each record of that step]} from a run's logs/metrics.jsonl (training records only)."""
    out: dict[int, list[float]] = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "train":
                out.setdefault(record["step"], []).append(record["loss"])
    return out


def time_limit_checks(cluster: Cluster) -> list[float]:
    """Epoch times at which slurmctld tested job time limits (its debug2 log line; before the first test, its
    start): it tests every 30 s (PERIODIC_TIMEOUT, give or take a second) and sends a job's --signal at the first
    test that finds the job within the signal's lead time plus 30 s of its end."""
    log = (cluster.log_dir / "slurmctld.log").read_text(errors="replace")
    tests = re.findall(r"^\[(\S+)\] debug2: Testing job time limits", log, re.M)
    if not tests:  # none yet: the first comes 30 s after slurmctld started
        tests = re.findall(r"^\[(\S+)\] slurmctld version \S+ started", log, re.M)[-1:]
    return [datetime.strptime(m, "%Y-%m-%dT%H:%M:%S.%f").timestamp() for m in tests]
