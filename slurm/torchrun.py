"""torchrun as slurm/node.sh runs it: the same launcher, without its own report of failed ranks.

When a trainer exits non-zero, torchrun logs "failed (exitcode: N)" and ends with a ChildFailedError traceback and
a table of every failed rank (about 50 lines), after the trainer has already printed the one line that says what
went wrong and how to fix it. node.sh reports each rank's exit status itself (slurm/rank.py), so here a failed or
signalled launch ends with status 1 and one short line instead; torchrun's other messages are kept.

A stop (SIGTERM, SIGUSR1) is not torchrun's to handle: node.sh asks the trainers directly, exactly once, and torchrun
waits for them to checkpoint and exit. Here both are ignored, so that a stop signal that also reaches this process
(Slurm's linuxproc tracking signals every process of the step) cannot start torchrun's own shutdown, which would
kill the trainers mid-checkpoint after TORCH_ELASTIC_SHUTDOWN_TIMEOUT or on a second signal. node.sh passes
--signals-to-handle without them; SIGINT, SIGHUP and SIGQUIT still abort. This process dies with node.sh.

    python slurm/torchrun.py [torchrun arguments] script [script arguments]
"""

import logging
import os
import signal
import sys

from qwenvl_mcore.lifetime import die_with_parent

if __name__ == "__main__":  # before torch loads (seconds), during which a stop signal would otherwise kill us
    die_with_parent(os.getppid())
    for _sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(_sig, signal.SIG_IGN)

from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import parse_args, run  # noqa: E402


class _DropFailureReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropFailureReport())
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        failed = sorted(e.failures)
        print(f"[torchrun] {len(failed)} rank(s) exited non-zero (global ranks {failed}); statuses below",
              file=sys.stderr)
        return 1
    except SignalException as e:
        print(f"[torchrun] stopped by {e.sigval.name}; passed on to the trainers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
