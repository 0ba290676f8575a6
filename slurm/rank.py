"""One trainer rank under torchrun (slurm/node.sh runs `torchrun ... slurm/rank.py -m qwenvl_mcore.train ...`):
runs this interpreter with the given arguments and leaves how it ended in $QW_STATUS_DIR/rank_$LOCAL_RANK, its
exit status or "signal N". torchrun exits 1 whatever its ranks returned, and to a shell a trainer killed by SIGTERM
(before it handles the signal) would look like its own 143, the status of a checkpointed stop. To torchrun this
process reports a checkpointed stop (143) as success, so that it waits for every rank to finish.

Neither this process nor the trainer outlives its parent: each is SIGKILLed by the kernel when the process that
started it dies (torchrun, then this one), so a job step whose torchrun is killed leaves no trainer behind, under
any Slurm process tracking (linuxproc loses processes that re-parent to init; pgid those in other sessions).
"""

import os
import signal
import subprocess
import sys

from qwenvl_mcore.lifetime import die_with_parent


def main() -> int:
    die_with_parent(os.getppid())
    # Stop signals are the trainer's business (slurm/node.sh asks it through $QW_STOP_FILE; under Slurm's linuxproc
    # tracking every process of the step is signalled too): this process only has to outlive the trainer to record
    # how it ended. The trainer starts with the default dispositions (exec resets handlers).
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda *_: None)
    me = os.getpid()
    rc = subprocess.call([sys.executable, *sys.argv[1:]], preexec_fn=lambda: die_with_parent(me))
    status_dir = os.environ.get("QW_STATUS_DIR")
    if status_dir:
        with open(os.path.join(status_dir, f"rank_{os.environ['LOCAL_RANK']}"), "w") as f:
            f.write(f"signal {-rc}\n" if rc < 0 else f"{rc}\n")
    if rc == 143:
        # A checkpointed stop is every rank's decision (they agree on it after a step): report success to torchrun,
        # which would otherwise take the first rank to exit for a failure and SIGTERM the others while they finish
        # (rank 0 may still be closing its logs). node.sh reads the real status from the file above.
        return 0
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
