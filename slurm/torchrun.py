"""torchrun as slurm/node.sh runs it: the same launcher, without its own report of failed ranks.

When a trainer exits non-zero, torchrun logs "failed (exitcode: N)" and ends with a ChildFailedError traceback and
a table of every failed rank (about 50 lines), after the trainer has already printed the one line that says what
went wrong and how to fix it. node.sh reports each rank's exit status itself (slurm/rank.py), so here a failed or
signalled launch ends with status 1 and one short line instead; torchrun's other messages are kept.

    python slurm/torchrun.py [torchrun arguments] script [script arguments]
"""

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


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
