"""A real single-node Slurm (munged, slurmctld, slurmd) started on this machine for the tests, or by hand.

    python tests/slurm/cluster.py start --proctrack linuxproc --dir /tmp/qwslurm   # prints `export SLURM_CONF=...`
    python tests/slurm/cluster.py stop --dir /tmp/qwslurm

Everything lives under the cluster's directory: slurm.conf (cgroup.conf under proctrack/cgroup), a munge key,
socket and pid file of its own, slurmctld's state, slurmd's spool, the daemons' logs and `pids.json`. Client
commands find the cluster through SLURM_CONF only (`Cluster.env()`); nothing under /etc is read or changed.

Contracts:
- `Cluster.start()` returns once the node is idle, or raises `ClusterError` with the daemons' log tails; it
  refuses to start while Slurm's ports are taken (one cluster at a time on a machine).
- `Cluster.stop()` stops the daemons by PID (SIGTERM, then SIGKILL), kills whatever still carries this cluster's
  marker in its environment (slurmstepd, job processes: every process started under the cluster inherits it) and
  returns the names of the processes it had to kill; afterwards none of them remains.
- Nodes: one, named after `hostname`, CPUs and memory from `slurmd -C`. Partitions: `debug` (default,
  PriorityTier=1, GraceTime) and `urgent` (PriorityTier=10) on that node; pre-emption by partition priority with
  REQUEUE and the user signal first (`SlurmctldParameters=preempt_send_user_signal`, the Slurm 22.05 spelling).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
PROCTRACKS = ("linuxproc", "cgroup")
MARKER = "QW_SLURM_TEST_CLUSTER"  # in the environment of the daemons and of every job submitted through env()
CTLD_PORT, SLURMD_PORT = 6817, 6818
GRACE_TIME = 60  # seconds the `debug` partition's jobs get between the pre-emption signal and being requeued
KILL_WAIT = 20
CRED_EXPIRE = 5  # seconds between SIGTERM and SIGKILL at the time limit and on cancellation


class ClusterError(RuntimeError):
    pass


def missing_programs() -> list[str]:
    """Slurm and munge programs this harness needs that are not installed (sbin included: PATH may lack it)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    return [p for p in (*DAEMONS, *CLIENTS, "mungekey") if not shutil.which(p, path=path)]


def _which(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    found = shutil.which(name, path=path)
    if not found:
        raise ClusterError(f"{name} is not installed: apt-get install -y slurm-wlm munge (tests/slurm/ensure_slurm.sh)")
    return found


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def processes_with_env(predicate) -> dict[int, str]:
    """{pid: command line} of every process whose environment (a dict) satisfies `predicate`; this process and
    those we may not read are left out."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                raw = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if predicate(env) and _alive(int(entry)):
            found[int(entry)] = cmd
    return found


def _ancestors() -> set[int]:
    """This process and its ancestors."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def kill_and_wait(pids, timeout: float = 10.0) -> None:
    """SIGKILL each pid and wait until none runs (raises ClusterError naming the survivors)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while any(_alive(p) for p in pids):
        if time.time() > deadline:
            raise ClusterError(f"still alive after SIGKILL: {[p for p in pids if _alive(p)]}")
        time.sleep(0.1)


def node_hardware() -> dict:
    """Hostname, CPUs and memory (MB) of this machine as slurmd sees them (`slurmd -C`)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    return {"name": socket.gethostname().split(".")[0], "cpus": int(fields["CPUs"]),
            "memory": int(fields["RealMemory"])}


@dataclass
class Cluster:
    """One cluster under `root`; `proctrack` is linuxproc or cgroup."""

    root: Path
    proctrack: str = "linuxproc"
    pids: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        if self.proctrack not in PROCTRACKS:
            raise ValueError(f"proctrack: one of {PROCTRACKS}, not {self.proctrack!r}")

    # -- paths and environment --------------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self, **extra) -> dict:
        """The environment for client commands and jobs: SLURM_CONF, the cluster marker, /usr/sbin on PATH, no
        SLURM_* or MASTER_* variables inherited from an enclosing job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "SBATCH_", "SRUN_"))}
        path = env.get("PATH", "")
        for extra_dir in ("/usr/sbin", "/sbin"):
            if extra_dir not in path.split(os.pathsep):
                path = f"{path}{os.pathsep}{extra_dir}" if path else extra_dir
        return {**env, "PATH": path, "SLURM_CONF": str(self.conf), MARKER: str(self.root), **extra}

    # -- configuration ----------------------------------------------------------------------------------------
    def write_config(self) -> None:
        hw = node_hardware()
        self.node = hw["name"]
        for d in ("etc", "state", "spool", "log", "munge", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)
        memory = max(hw["memory"] - 1024, 1024)  # a bit below the machine's: slurmd must not find less
        cgroup = self.proctrack == "cgroup"
        lines = [
            "ClusterName=qwtest",
            f"SlurmctldHost={self.node}",
            f"SlurmctldPort={CTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            "SlurmctldDebug=debug2",
            "SlurmdDebug=info",
            f"ProctrackType=proctrack/{self.proctrack}",
            f"TaskPlugin={'task/cgroup' if cgroup else 'task/none'}",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=3,bf_interval=3",  # a requeued job starts soon after it may
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "JobRequeue=1",
            f"KillWait={KILL_WAIT}",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` for the whole test run
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "SlurmctldParameters=preempt_send_user_signal",
            f"NodeName={self.node} CPUs={hw['cpus']} RealMemory={memory} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
            f"GraceTime={GRACE_TIME}",
            f"PartitionName=urgent Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=10",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        if cgroup:
            # cgroup v1 controllers are mounted by the machine; Slurm only creates its hierarchy under them.
            (self.root / "etc" / "cgroup.conf").write_text(
                "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=no\n"
                "ConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n")

    # -- daemons ----------------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> int:
        log = open(self.log_dir / f"{name}.out", "ab")
        # A session of their own: a Ctrl-C meant for pytest does not stop them; stop() does.
        proc = subprocess.Popen(argv, env=self.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        log.close()
        self.pids[name] = proc.pid
        self._save_pids()
        return proc.pid

    def _save_pids(self) -> None:
        (self.root / "pids.json").write_text(json.dumps({"proctrack": self.proctrack, "pids": self.pids}))

    def start(self, timeout: float = 60.0) -> "Cluster":
        for port in (CTLD_PORT, SLURMD_PORT):
            if _port_in_use(port):
                raise ClusterError(f"port {port} is taken: another Slurm runs here (stop it first; "
                                   "`python tests/slurm/cluster.py stop --dir DIR` for one started by hand)")
        self.write_config()
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}", "--force"], check=True,
                           capture_output=True)
        key.chmod(0o400)
        try:
            self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={key}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                                   f"--log-file={self.log_dir / 'munged.log'}",
                                   f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
            self._wait(lambda: self.munge_socket.exists(), 15, "munged's socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
            self._wait(lambda: self._client("scontrol", "ping").returncode == 0
                       and "UP" in self._client("scontrol", "ping").stdout, 30, "slurmctld to answer")
            self._spawn("slurmd", [_which("slurmd"), "-D"])
            self._wait(self._node_idle, timeout, "the node to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([_which(argv[0]), *argv[1:]], env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def _node_idle(self) -> bool:
        out = self._client("sinfo", "-h", "-N", "-o", "%T").stdout.split()
        return bool(out) and all(s == "idle" for s in out)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
            for name, pid in self.pids.items():
                if not _alive(pid):
                    raise ClusterError(f"{name} exited while waiting for {what}\n{self.log_tails()}")
            if time.time() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.log_tails()}")
            time.sleep(0.3)

    def log_tails(self, lines: int = 25) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> list[str]:
        """Stop the daemons and every process of this cluster; returns the command lines that had to be killed
        besides the daemons themselves (job processes or slurmstepd still running)."""
        for name in ("slurmd", "slurmctld", "munged"):  # the node first: it still talks to the controller
            pid = self.pids.get(name)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.time() + 15
                while _alive(pid) and time.time() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    kill_and_wait([pid])
            self._reap(pid)
        root = str(self.root)
        # Job processes (submitted through env(), or by hand with this SLURM_CONF) and slurmstepd only: never a
        # shell that merely has the marker or SLURM_CONF, nor our own ancestors.
        mine = _ancestors()
        conf = str(self.conf)
        strays = {pid: cmd for pid, cmd in processes_with_env(
            lambda env: "SLURM_JOB_ID" in env and (env.get(MARKER) == root or env.get("SLURM_CONF") == conf)).items()
            if pid not in mine}
        strays.update({pid: cmd for pid, cmd in processes_with_env(lambda env: env.get(MARKER) == root).items()
                       if cmd.startswith("slurmstepd") and pid not in mine})
        if strays:
            kill_and_wait(list(strays))
        left = [p for p in self.pids.values() if _alive(p)]
        if left:
            raise ClusterError(f"daemons still alive after stop: {left}")
        self.pids = {}
        if (self.root / "pids.json").exists():
            self._save_pids()
        return list(strays.values())

    @staticmethod
    def _reap(pid) -> None:
        if not pid:
            return
        try:
            os.waitpid(pid, os.WNOHANG)  # our child when started by this process: no zombie left behind
        except ChildProcessError:
            pass

    @classmethod
    def attach(cls, root: Path) -> "Cluster":
        """The cluster a previous `start` left under `root` (its pids.json)."""
        saved = json.loads((Path(root) / "pids.json").read_text())
        return cls(Path(root), saved["proctrack"], {k: int(v) for k, v in saved["pids"].items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a cluster under --dir and print the SLURM_CONF to export")
    start.add_argument("--dir", required=True, type=Path)
    start.add_argument("--proctrack", choices=PROCTRACKS, default="linuxproc")
    stop = sub.add_parser("stop", help="stop the cluster started under --dir (daemons and stray job processes)")
    stop.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "start":
        cluster = Cluster(args.dir, args.proctrack).start()
        print(f"# {args.proctrack} cluster up, daemons {cluster.pids}; logs in {cluster.log_dir}")
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        killed = Cluster.attach(args.dir).stop()
        print(f"stopped{'; killed strays: ' + '; '.join(killed) if killed else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
