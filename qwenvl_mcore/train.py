"""Entry point of a training run: `python -m qwenvl_mcore.train [Hydra overrides ...]`, one process per rank
(torchrun, or launch/ scripts). Examples:

    torchrun --nproc-per-node 4 -m qwenvl_mcore.train experiment=debug_cpu_tp2_ep2
    torchrun ... -m qwenvl_mcore.train experiment=sft_30b_a3b_2x8xh100 model.init_from=ckpt/qwen3vl-30b optim.lr=5e-6

The run resumes by itself from <checkpoint.dir>/latest. Exit status: 0 done, 143 stopped by SIGTERM/SIGUSR1 (or by
the file $QW_STOP_FILE appearing: slurm/node.sh's way of asking) after checkpointing (start the same command again to
resume), 3 too many non-finite steps, 2 bad configuration or input.
`--print-config` prints the resolved configuration and exits. SIGUSR2 prints every thread's Python stack to stderr
(a run that seems stuck: `pkill -USR2 -f qwenvl_mcore.train`) and lets the run go on.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

EXIT_CODES = {"completed": 0, "preempted": 143, "bad_steps": 3}
EXIT_BAD_INPUT = 2


def report_error(message: str) -> None:
    """Say what stopped the run once, not once per rank. Under slurm/node.sh (QW_STATUS_DIR set) each rank leaves
    its message in the node's status directory and node.sh prints every distinct message once; otherwise each rank
    prints it, naming itself when there are several."""
    status_dir = os.environ.get("QW_STATUS_DIR")
    if status_dir:
        with open(os.path.join(status_dir, f"error_{os.environ.get('LOCAL_RANK', '0')}"), "w") as f:
            f.write(message)
        return
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    print(f"error (rank {os.environ.get('RANK', '0')}): {message}" if several else f"error: {message}",
          file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from qwenvl_mcore import library_noise

    library_noise.install()  # before megatron and torch.distributed are imported: they warn at import time
    # A stop signal (Slurm pre-emption) may come while the libraries load and the model is built: record it, so the
    # run checkpoints after its first step and exits 143 (requeued), instead of dying unrequeued.
    early: list[int] = []
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda signum, frame: early.append(signum))
    from qwenvl_mcore.checkpoint.model_io import CheckpointError
    from qwenvl_mcore.data.collate import DataError
    from qwenvl_mcore.models.qwen3_vl_moe.config import ModelConfigError
    from qwenvl_mcore.parallel.layout import LayoutError
    from qwenvl_mcore.training.config import ConfigError, compose

    print_only = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    try:
        cfg = compose(argv)
    except ConfigError as e:
        report_error(str(e))
        return EXIT_BAD_INPUT
    if print_only:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    from qwenvl_mcore.parallel.distributed import destroy_distributed
    from qwenvl_mcore.training.trainer import train

    try:
        # slurm/node.sh asks its trainers to stop by creating this file (and may also signal them).
        status = train(cfg, early_signals=early, stop_file=os.environ.get("QW_STOP_FILE"))
    except (ConfigError, CheckpointError, ModelConfigError, LayoutError, DataError) as e:
        report_error(str(e))
        return EXIT_BAD_INPUT
    finally:
        destroy_distributed()
    return EXIT_CODES[status]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
