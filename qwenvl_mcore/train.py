"""Entry point of a training run: `python -m qwenvl_mcore.train [Hydra overrides ...]`, one process per rank
(torchrun, or launch/ scripts). Examples:

    torchrun --nproc-per-node 4 -m qwenvl_mcore.train experiment=debug_cpu_tp2_ep2
    torchrun ... -m qwenvl_mcore.train experiment=sft_30b_a3b_2x8xh100 model.init_from=ckpt/qwen3vl-30b optim.lr=5e-6

The run resumes by itself from <checkpoint.dir>/latest. Exit status: 0 done, 143 stopped by SIGTERM/SIGUSR1 (or by
the file $QW_STOP_FILE appearing: slurm/node.sh's way of asking) after checkpointing (start the same command again to
resume), 3 too many non-finite steps, 2 bad configuration or input.
`--print-config` (or Hydra's `--cfg job`) prints the resolved configuration and exits; `--help` lists the config
groups. SIGUSR2 prints every thread's Python stack to stderr (a run that seems stuck:
`pkill -USR2 -f qwenvl_mcore.train`) and lets the run go on.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path

EXIT_CODES = {"completed": 0, "preempted": 143, "bad_steps": 3}
EXIT_BAD_INPUT = 2
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the same directory training/config.py composes from

FLAGS = """== Flags ==
  -h, --help          this text
  --print-config      print the resolved configuration (YAML) and exit
  -c job, --cfg job   Hydra's spelling of --print-config: the job's configuration, resolved, as YAML
  --resolve           accepted for Hydra's sake: what --cfg job prints is always resolved"""


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


def config_groups() -> dict[str, list[str]]:
    """Every config group (a directory of conf/) and its options (the yaml files in it, by name)."""
    return {d.name: sorted(f.stem for f in d.glob("*.yaml"))
            for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and any(d.glob("*.yaml"))}


def help_text() -> str:
    """The module's doc, its flags, then Hydra's `group: option, option` listing with each group's default."""
    from omegaconf import OmegaConf

    defaults = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            defaults.update(entry)
    groups = "\n".join(f"{name}: {', '.join(options)}" + (f"  (default: {defaults[name]})" if defaults.get(name) else "")
                       for name, options in config_groups().items())
    return (f"{__doc__.strip()}\n\n{FLAGS}\n\n== Configuration groups ==\n"
            f"Compose your configuration from those groups (group=option)\n\n{groups}\n\n== Config ==\n"
            "Override anything in the config (foo.bar=value); `--cfg job [overrides]` shows all of it.")


def split_flags(argv: list[str]) -> tuple[bool, list[str]]:
    """(print the configuration and exit?, the Hydra overrides left). `--cfg job`, `--cfg=job`, `-c job` (Hydra's
    spellings) mean what `--print-config` means; `--resolve` is accepted and changes nothing. Raises ValueError
    for `--cfg` without `job`: this entry point has no Hydra runtime (`hydra`, `all`) to print."""
    print_only, rest, i = False, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--print-config":
            print_only = True
        elif arg in ("--cfg", "-c") or arg.startswith("--cfg="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            i += "=" not in arg
            if value != "job":
                raise ValueError(f"{arg.split('=')[0]} {value or ''}".rstrip() + ": only `--cfg job` is supported "
                                 "(the run's configuration; this entry point composes without Hydra's runtime config)")
            print_only = True
        elif arg != "--resolve":
            rest.append(arg)
        i += 1
    return print_only, rest


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        print_only, argv = split_flags(argv)
    except ValueError as e:
        report_error(str(e))
        return EXIT_BAD_INPUT
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
