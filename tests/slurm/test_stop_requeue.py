"""Issue 17 on a real Slurm: launch/sft_moe.sh stopped by the time limit, by `scancel --signal=USR1 --batch`
during a periodic checkpoint and by partition-priority pre-emption, each time checkpointing, exiting 143 and
being requeued; it resumes and completes with the per-step losses of an uninterrupted run, and no process of the
job outlives an attempt. Under proctrack/cgroup, what production clusters run, or proctrack/linuxproc where the
machine cannot run cgroup (the reason is printed in the session's summary); QW_SLURM_PROCTRACKS=linuxproc,cgroup
runs the scenario under both, one after the other (about four minutes each on 2 cores; CI runs one:
test_convert_job.py's jobs run under linuxproc). tests/slurm/scenario.py drives the job; the tests below read its
record."""

from __future__ import annotations

import os
import re

import pytest

from cluster import GRACE_TIME
from harness import start_cluster
from jobs import job_time, losses
from scenario import EVERY, STEPS, TIME_LIMIT, run_scenario


PROCTRACKS = [p for p in os.environ.get("QW_SLURM_PROCTRACKS", "cgroup").split(",") if p]
if not PROCTRACKS or set(PROCTRACKS) - {"linuxproc", "cgroup"}:
    raise ValueError(f"QW_SLURM_PROCTRACKS={os.environ.get('QW_SLURM_PROCTRACKS')!r}: a comma-separated list of "
                     "linuxproc and cgroup")


@pytest.fixture(scope="module", params=PROCTRACKS)
def cluster(request, slurm_programs, tmp_path_factory):
    # cgroup alone: where the machine cannot run it, the scenario runs under linuxproc instead of not at all
    fallback = "linuxproc" if request.param == "cgroup" and "linuxproc" not in PROCTRACKS else None
    yield from start_cluster(request.param, tmp_path_factory.mktemp(f"slurm_{request.param}"), fallback=fallback)


_PACES_SEEN: list[tuple[float, float]] = []  # what each finished scenario's attempt 1 kept, for the next


@pytest.fixture(scope="module")
def record(cluster, reference, tmp_path_factory):
    reference.losses()  # trained to the end first: the job's timing must not compete with it for the 2 cores
    pace = _PACES_SEEN[-1] if _PACES_SEEN else reference.pace()
    rec = run_scenario(cluster, tmp_path_factory.mktemp(f"job_{cluster.proctrack}"), pace)
    if rec.pace_seen:
        _PACES_SEEN.append(rec.pace_seen)
    print(f"\n[{rec.proctrack}: job {rec.job_id}, --signal=B:USR1@{rec.lead} aimed {rec.signal_at}s after the start "
          f"from the pace {tuple(round(x, 2) for x in pace)} (start-up s, s per step), stops at steps "
          f"{[a.stop_step for a in rec.attempts]}, {len(rec.attempts)} attempts in {rec.seconds:.0f}s"
          f"{'; ' + rec.error if rec.error else ''}]")
    return rec


def _stopped_and_requeued(rec, n: int, how: str):
    """Attempt n: the trainers checkpointed at the step they stopped at, exited 143, the job was requeued and
    the next attempt resumed from that step."""
    attempt = rec.attempt(n)
    assert attempt is not None and attempt.info, f"attempt {n} ({how}) never ended in a requeue\n{rec.context()}"
    step = attempt.stop_step
    assert step is not None, f"attempt {n} ({how}): no 'stopped by signal at step N; checkpoint' line\n" \
                             f"{attempt.text[-5000:]}\n{rec.context(1000)}"
    assert attempt.latest == f"step_{step:07d}", (attempt.latest, attempt.checkpoints, attempt.text[-3000:])
    assert not [c for c in attempt.checkpoints if c.endswith(".incomplete")], attempt.checkpoints
    assert "Exited with exit code 143" in attempt.text, attempt.text[-4000:]  # srun: the node's status
    assert int(attempt.info["Restarts"]) == n, attempt.info
    following = rec.attempt(n + 1)
    assert following is not None and following.start_step == step, \
        f"attempt {n + 1} did not resume from step {step}\n{rec.context()}"
    assert not attempt.leftovers, f"attempt {n} ({how}) left processes running:\n" + "\n".join(attempt.leftovers)
    return attempt, step


def test_time_limit_signal_checkpoints_and_requeues(record):
    """--time=2 --signal=B:USR1@LEAD: the warning reaches the trainers after a periodic checkpoint ran."""
    assert record.job_id, record.context()
    assert record.time_limit_signals, f"slurmctld never sent the time-limit signal\n{record.context()}"
    sent = record.time_limit_signals[0] - record.start
    earliest = 60 * TIME_LIMIT - record.lead - 30
    assert earliest - 1 <= sent < earliest + 31, (sent, record.lead)
    attempt, step = _stopped_and_requeued(record, 1, "time limit")
    assert step > EVERY, f"stopped at step {step}: no periodic checkpoint (every {EVERY}) had run before the signal"


def test_scancel_during_a_periodic_checkpoint(record):
    """`scancel --signal=USR1 --batch` while <trainer.dir>/checkpoints/.step_N.incomplete is being written."""
    assert record.staging_at_scancel, f"never saw a periodic checkpoint being written\n{record.context()}"
    periodic = int(re.match(r"\.step_(\d+)\.", record.staging_at_scancel).group(1))
    attempt, step = _stopped_and_requeued(record, 2, "scancel")
    assert step >= periodic and f"step_{periodic:07d}" in attempt.checkpoints, (periodic, attempt.checkpoints)
    print(f"[scancel sent while {record.staging_at_scancel} was written "
          f"({'still' if record.staging_still_there else 'no longer'} there once scancel returned); stop at {step}]")


def test_partition_preemption_checkpoints_and_requeues(record):
    """A job in `urgent` (PriorityTier 10) needing the whole node pre-empts the job in `debug`: the user signal
    (preempt_send_user_signal), a checkpoint within the GraceTime, a requeue; the urgent job runs in between."""
    attempt, step = _stopped_and_requeued(record, 3, "preemption")
    assert record.urgent_info.get("JobState") == "COMPLETED", record.urgent_info
    # the user signal (not SIGTERM) at pre-emption, once; the trainers' stop then took less than the GraceTime
    assert len(record.preemption_signals) == 1, record.preemption_signals
    assert job_time(record.urgent_info["StartTime"]) >= int(record.preemption_signals[0]), record.urgent_info
    assert job_time(record.urgent_info["StartTime"]) < record.preemption_signals[0] + GRACE_TIME, \
        "the urgent job waited for the whole GraceTime: the pre-empted job did not end by itself"


def test_resumed_job_completes_with_the_uninterrupted_losses(record, reference):
    """The job ends COMPLETED (exit 0) after its requeues; every step's loss equals the reference run's, exactly."""
    assert record.final.get("JobState") == "COMPLETED" and record.final.get("ExitCode") == "0:0", \
        f"{record.final}\n{record.context()}"
    assert int(record.final["Restarts"]) == 3, record.final
    assert len(record.time_limit_signals) == 1, record.time_limit_signals
    assert f"done at step {STEPS}" in record.attempts[-1].text, record.attempts[-1].text[-4000:]
    got = losses(record.run_dir / "logs" / "metrics.jsonl")
    expected = reference.losses()
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1)), (sorted(got), sorted(expected))
    differ = {s: (v, expected[s]) for s, v in got.items() if any(x != expected[s] for x in v)}
    assert not differ, f"per-step losses differ from the uninterrupted run's: {differ}"


def test_no_process_of_the_job_remains(record):
    """After each attempt and after the job: none of its processes (SLURM_JOB_ID in the environment, or the run's
    trainer.dir on the command line) is alive (checked for up to 10 s, then killed)."""
    assert record.job_id and record.final, record.context()
    left = {f"attempt {a.number}": a.leftovers for a in record.attempts if a.leftovers}
    if record.final_leftovers:
        left["after the job"] = record.final_leftovers
    assert not left, left
