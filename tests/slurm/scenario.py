"""The stop/requeue scenario the real-Slurm tests check: one `sbatch launch/sft_moe.sh` job (4 CPU ranks, TP2 x EP2,
periodic checkpoints) stopped three times, each stop a different way, then left to complete:

  attempt 1: the time limit's warning signal (--time=2 --signal=B:USR1@LEAD), aimed after a periodic checkpoint;
  attempt 2: `scancel --signal=USR1 --batch` while a periodic checkpoint is being written;
  attempt 3: partition-priority pre-emption: a job in `urgent` asks for the whole node (the user signal, GraceTime);
  attempt 4: resumes and completes.

One job rather than three keeps the trainer start-ups (about 25 s each on 2 cores) within the test budget; each
stop is still checked on its own (tests/slurm/test_stop_requeue.py reads the record `run_scenario` returns).
`run_scenario` never raises on the job's misbehaviour: it records what happened, and the first thing that went
wrong in `error`, then cancels what is left and kills any process of the job.

Timing: slurmctld tests time limits every 30 s and sends --signal at the first test that finds the job within
lead + 30 s of its end: with --time=2, 90 - LEAD to 120 - LEAD s after the start. The job is submitted so that a
test falls SIGNAL_AT = 96 - LEAD s after its start (the tests' times are in slurmctld's debug2 log), with SIGNAL_AT
chosen from a pace (start-up, seconds per step) so that attempt 1 stops near step STOP_AIM: after a periodic
checkpoint, and early enough (by LATEST_STOP) that attempts 2 and 3, each stopped at its first periodic checkpoint,
leave steps for attempt 4. The first scenario takes the reference run's pace, which errs slow (it starts while the
conversion tests run); the next takes the pace its predecessor's attempt 1 was seen to keep (`Record.pace_seen`).
The aim sits low in the window [EVERY + 1, LATEST_STOP] because a wrong pace errs towards a late stop.
Once attempt 1 is requeued its time limit is raised to 10 minutes (`scontrol update`, as an administrator would):
the later attempts would otherwise each meet the 2-minute limit too, correct but a start-up more each time.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cluster import Cluster
from harness import StepClock, pace_of
from jobs import CPU_NODE, FINISHED, job_info, job_time, leftover_processes, run, sbatch, time_limit_checks, wait_for

STEPS = 42
EVERY = 3
STOP_AIM = 12  # the step attempt 1 should stop at
LATEST_STOP = STEPS - 2 * (EVERY + 2) - 1  # ... at the latest: attempts 2 and 3 take at most EVERY + 2 steps each
TIME_LIMIT = 2  # minutes, for attempt 1
LATER_TIME_LIMIT = 10  # minutes, from attempt 2 on
OVERRIDES = ["experiment=debug_cpu_tp2_ep2", f"trainer.steps={STEPS}", "trainer.eval_every=0",
             f"checkpoint.every={EVERY}", "data.num_workers=1", "logging.progress_bar=false",
             "logging.tensorboard=false"]
STAGING = re.compile(r"^\.step_(\d+)\.incomplete$")


@dataclass
class Attempt:
    number: int  # 1: the first start
    how: str  # what was meant to stop it: "time limit", "scancel", "preemption", "" (let it run)
    text: str = field(default="", repr=False)  # its part of the job's output file
    leftovers: list[str] = field(default_factory=list)  # its processes found alive after it ended
    checkpoints: list[str] = field(default_factory=list)  # <trainer.dir>/checkpoints after it ended
    latest: str = ""
    info: dict = field(default_factory=dict)  # scontrol show job once it ended

    @property
    def stop_step(self) -> int | None:
        m = re.search(r"stopped by signal at step (\d+); checkpoint (\S+?);", self.text)
        return int(m.group(1)) if m else None

    @property
    def start_step(self) -> int | None:
        m = re.search(r"from step (\d+) \(sample \d+\)", self.text)
        return int(m.group(1)) if m else None


@dataclass
class Record:
    proctrack: str
    run_dir: Path
    output: Path
    job_id: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    error: str = ""  # the first thing that went wrong, with context
    start: float = 0.0  # attempt 1's start (epoch s, from Slurm)
    lead: int = 0  # --signal=B:USR1@lead
    signal_at: int = 0  # where attempt 1's time-limit signal was aimed, s after its start
    time_limit_signals: list[float] = field(default_factory=list)  # times slurmctld sent --signal for the limit
    preemption_signals: list[float] = field(default_factory=list)  # ... and for a pre-emption (with GraceTime)
    staging_at_scancel: str = ""  # the periodic checkpoint being written when scancel was sent
    staging_still_there: bool = False  # ... and still being written once scancel had returned
    urgent_id: int = 0
    urgent_info: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    final_leftovers: list[str] = field(default_factory=list)
    ctld_log: str = field(default="", repr=False)
    seconds: float = 0.0
    pace: tuple[float, float] = (0.0, 0.0)  # the (start-up s, s per step) attempt 1 was aimed with
    pace_seen: tuple[float, float] | None = None  # ... and the one it kept (from its metrics.jsonl lines)

    def attempt(self, n: int) -> Attempt | None:
        return self.attempts[n - 1] if len(self.attempts) >= n else None

    def context(self, chars: int = 6000) -> str:
        """The job's output tail, for assertion messages."""
        text = self.output.read_text(errors="replace") if self.output.exists() else "(no output file)"
        return f"[{self.proctrack}] job {self.job_id}{': ' + self.error if self.error else ''}\n{text[-chars:]}"


def run_scenario(cluster: Cluster, work: Path, pace: tuple[float, float]) -> Record:
    """`pace`: (start-up s, s per step) of the reference run."""
    rec = Record(cluster.proctrack, work / "run", work / "job.out", pace=pace)
    startup, per_step = pace
    # not before the first periodic checkpoint is surely written, nor later than the lead allows (lead >= 11)
    rec.signal_at = int(min(max(startup + per_step * STOP_AIM, startup + per_step * (EVERY + 1.5), 15), 85))
    rec.lead = 60 * TIME_LIMIT - 24 - rec.signal_at  # the earliest test that may send it: 6 s before signal_at
    t0 = time.time()
    clock = StepClock(rec.run_dir / "logs" / "metrics.jsonl")
    try:
        _drive(cluster, rec, clock)
    except Exception as e:  # recorded for the tests, which fail on it with the job's output
        rec.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-2)}"
    finally:
        clock.stop()
        if rec.job_id:
            info = job_info(cluster, rec.job_id)
            if info and info.get("JobState") not in FINISHED:
                run(cluster, "scancel", str(rec.job_id), check=False)
                wait_for(lambda: job_info(cluster, rec.job_id).get("JobState") in FINISHED, 60, "scancel")
            rec.final = job_info(cluster, rec.job_id)
            rec.final_leftovers = leftover_processes(cluster, rec.job_id, rec.run_dir)
        rec.ctld_log = (cluster.log_dir / "slurmctld.log").read_text(errors="replace")
        if rec.job_id:
            rec.time_limit_signals, rec.preemption_signals = _warning_signals(rec.ctld_log, rec.job_id)
        rec.seconds = time.time() - t0
    return rec


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def _warning_signals(log: str, job_id: int) -> tuple[list[float], list[float]]:
    """Times slurmctld sent the job's --signal (send_job_warn_signal), split by cause: a time-limit test logged
    just before it, or the GraceTime set for a pre-emption just before it (their debug log lines)."""
    def times(pattern):
        return [_stamp(m) for m in re.findall(rf"^\[(\S+)\] {pattern}", log, re.M)]

    limit_tests = times(r"debug2: Testing job time limits")
    grace = times(rf"debug:  setting \d+ sec preemption grace time for JobId={job_id}\b")
    by_limit, by_preemption = [], []
    for t in times(rf"debug:  send_job_warn_signal: warning signal \d+ to JobId={job_id}\b"):
        if any(0 <= t - c < 1 for c in limit_tests):
            by_limit.append(t)
        elif any(0 <= t - c < 1 for c in grace):
            by_preemption.append(t)
    return by_limit, by_preemption


def _submit_aimed(cluster: Cluster, rec: Record, args: list[str]) -> None:
    """Submit so that one of slurmctld's time-limit tests falls rec.signal_at s after the job starts."""
    checks = time_limit_checks(cluster)
    period = 30.0 if len(checks) < 2 else min(max((checks[-1] - checks[0]) / (len(checks) - 1), 30.0), 31.0)
    latency = 0.7  # submission to start, on an idle node
    k = 1
    while checks[-1] + k * period - rec.signal_at - latency < time.time() + 0.3:
        k += 1
    time.sleep(max(0.0, checks[-1] + k * period - rec.signal_at - latency - time.time()))
    rec.job_id = sbatch(cluster, *args)


def _wait_state(cluster: Cluster, rec: Record, what: str, timeout: float, ready) -> dict:
    """Poll the job until ready(info) (returns info); AssertionError naming `what` when the job finishes first."""
    def check():
        info = job_info(cluster, rec.job_id)
        if ready(info):
            return info
        if info.get("JobState") in FINISHED:
            raise AssertionError(f"waiting for {what}, the job ended: {info}")
        return None

    return wait_for(check, timeout, what, log=rec.output)


def _end_attempt(cluster: Cluster, rec: Record, attempt: Attempt, restarts: int, timeout: float) -> None:
    """Wait until the job is requeued after `attempt` (pending, Restarts=restarts), then record the attempt."""
    info = _wait_state(cluster, rec, f"attempt {attempt.number} ({attempt.how}) to end in a requeue", timeout,
                       lambda i: int(i.get("Restarts", 0)) >= restarts and i.get("JobState") == "PENDING")
    _record_attempt(cluster, rec, attempt, info)


def _record_attempt(cluster: Cluster, rec: Record, attempt: Attempt, info: dict) -> None:
    attempt.info = info
    text = rec.output.read_text(errors="replace") if rec.output.exists() else ""
    attempt.text = text[sum(len(a.text) for a in rec.attempts[: attempt.number - 1]):]
    ckpt = rec.run_dir / "checkpoints"
    attempt.checkpoints = sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else []
    attempt.latest = (ckpt / "latest").read_text().strip() if (ckpt / "latest").exists() else ""
    attempt.leftovers = leftover_processes(cluster, rec.job_id, restarts=attempt.number - 1)


def _drive(cluster: Cluster, rec: Record, clock: StepClock) -> None:
    args = [*CPU_NODE, f"--export=ALL,GPUS_PER_NODE=4,SIGNAL_LEAD={rec.lead}", f"--time={TIME_LIMIT}",
            f"--signal=B:USR1@{rec.lead}",
            f"--output={rec.output}", "launch/sft_moe.sh", *OVERRIDES, f"trainer.dir={rec.run_dir}"]
    ckpt = rec.run_dir / "checkpoints"

    # 1: the time limit's warning signal
    a1 = Attempt(1, "time limit")
    rec.attempts.append(a1)
    _submit_aimed(cluster, rec, args)
    info = _wait_state(cluster, rec, "attempt 1 to start", 60, lambda i: i.get("JobState") == "RUNNING")
    rec.start = job_time(info["StartTime"])
    _end_attempt(cluster, rec, a1, 1, 60 * TIME_LIMIT + 90)
    rec.pace_seen = pace_of(list(clock.times), rec.start)
    if (a1.stop_step or 0) > LATEST_STOP:
        raise AssertionError(f"attempt 1 stopped at step {a1.stop_step}, after step {LATEST_STOP}: too late to leave "
                             f"steps for attempts 2 to 4. Its signal was aimed {rec.signal_at} s after the start "
                             f"from the pace (start-up s, s per step) {rec.pace}; it kept {rec.pace_seen}")
    run(cluster, "scontrol", "update", f"JobId={rec.job_id}", f"TimeLimit={LATER_TIME_LIMIT}")

    # 2: scancel --signal=USR1 --batch while a periodic checkpoint is being written
    a2 = Attempt(2, "scancel")
    rec.attempts.append(a2)
    _wait_state(cluster, rec, "attempt 2 to start", 60, lambda i: i.get("JobState") == "RUNNING")
    after = a1.stop_step or 0

    def staging():
        names = [p.name for p in ckpt.iterdir()] if ckpt.exists() else []
        return next((n for n in names if STAGING.match(n) and int(STAGING.match(n).group(1)) > after), None)

    rec.staging_at_scancel = wait_for(staging, 150, "a periodic checkpoint of attempt 2 being written", 0.02,
                                      log=rec.output)
    run(cluster, "scancel", "--signal=USR1", "--batch", str(rec.job_id))
    rec.staging_still_there = (ckpt / rec.staging_at_scancel).exists()
    _end_attempt(cluster, rec, a2, 2, 120)

    # 3: pre-emption by a job of the higher-priority partition, once attempt 3 wrote a periodic checkpoint
    a3 = Attempt(3, "preemption")
    rec.attempts.append(a3)
    _wait_state(cluster, rec, "attempt 3 to start", 60, lambda i: i.get("JobState") == "RUNNING")
    after = a2.stop_step or 0

    def periodic_written():
        latest = ckpt / "latest"
        m = re.match(r"step_(\d+)$", latest.read_text().strip()) if latest.exists() else None
        return bool(m) and int(m.group(1)) > after

    wait_for(periodic_written, 150, "a periodic checkpoint of attempt 3", 0.1, log=rec.output)
    rec.urgent_id = sbatch(cluster, "--partition=urgent", "--exclusive", "--time=1",
                           f"--output={rec.output.parent / 'urgent.out'}", "--wrap", "sleep 2")
    _end_attempt(cluster, rec, a3, 3, 60 + 60)  # GraceTime and a margin
    rec.urgent_info = wait_for(lambda: (i := job_info(cluster, rec.urgent_id)).get("JobState") in FINISHED and i,
                               60, "the urgent job to finish")

    # 4: runs to the end
    a4 = Attempt(4, "")
    rec.attempts.append(a4)
    info = _wait_state(cluster, rec, "attempt 4 to end", 300,
                       lambda i: i.get("JobState") in FINISHED or int(i.get("Restarts", 0)) > 3)
    _record_attempt(cluster, rec, a4, info)
