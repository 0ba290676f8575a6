"""One trainer rank under torchrun (slurm/node.sh runs `torchrun ... slurm/rank.py -m qwenvl_mcore.train ...`):
runs this interpreter with the given arguments and leaves how it ended in $QW_STATUS_DIR/rank_$LOCAL_RANK, its
exit status or "signal N". torchrun exits 1 whatever its ranks returned, and to a shell a trainer killed by SIGTERM
(before it handles the signal) would look like its own 143, the status of a checkpointed stop.
"""

import os
import signal
import subprocess
import sys


def main() -> int:
    # torchrun signals this rank's whole process group, the trainer included: this process only has to outlive the
    # trainer to record how it ended. The trainer starts with the default dispositions (exec resets handlers).
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda *_: None)
    rc = subprocess.call([sys.executable, *sys.argv[1:]])
    status_dir = os.environ.get("QW_STATUS_DIR")
    if status_dir:
        with open(os.path.join(status_dir, f"rank_{os.environ['LOCAL_RANK']}"), "w") as f:
            f.write(f"signal {-rc}\n" if rc < 0 else f"{rc}\n")
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
