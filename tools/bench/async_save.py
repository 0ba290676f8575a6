"""Step time with synchronous and asynchronous checkpoint saves (checkpoint.async_save), on the CPU.

    python tools/bench/async_save.py [--ranks 1] [--moe-width 2048] [--steps 12] [--every 3] [--repeats 1]

The debug model with wider experts (`--moe-width`: the checkpoint grows with it; the step, with few tokens, much
less) trains `--steps` steps three ways in one launch: no periodic save, checkpoint.every=N saved synchronously,
and the same asynchronously. For each it prints the training loop's wall time, the median iteration (a step plus
whatever the loop does after it: a save, an async poll) without and with a save, and the time the loop spends in
the save call (sync: the whole write; async: planning and the fork) and in waiting for writes (async). The final
save of a run is synchronous in every mode and is not counted. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _rank_fn(rank: int, world: int, work: str, args: dict) -> dict:
    import torch

    from qwenvl_mcore.checkpoint import manager
    from qwenvl_mcore.models.qwen3_vl_moe import debug_assets
    from qwenvl_mcore.training import config, trainer

    torch.set_num_threads(1)
    wide = debug_assets.tiny_hf_config(text={"moe_intermediate_size": args["moe_width"]}).to_dict()
    trainer.flavor_hf_config = lambda name: wide  # the debug flavor, wider experts (this process only)

    events: list[tuple[str, float, float]] = []

    def timed(kind, fn):
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                events.append((kind, start, time.perf_counter()))
        return run

    trainer._one_step = timed("step", trainer._one_step)
    trainer.save_training_checkpoint = timed("save", trainer.save_training_checkpoint)
    manager.AsyncSaver.poll = timed("poll", manager.AsyncSaver.poll)
    manager.AsyncSaver.wait = timed("wait", manager.AsyncSaver.wait)

    common = ["data.packing=false", "data.num_workers=0", "data.num_samples=16", "data.valid_samples=0",
              f"data.global_batch_size={2 * world}", "data.seq_length=192", "optim.warmup_steps=1",
              "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.keep=2",
              f"trainer.steps={args['steps']}", f"parallel.ep={world}"]
    modes = {"none": ["checkpoint.every=0"],
             "sync": [f"checkpoint.every={args['every']}", "checkpoint.async_save=false"],
             "async": [f"checkpoint.every={args['every']}", "checkpoint.async_save=true"]}
    out = {}
    for repeat in range(args["repeats"]):
        for mode, extra in modes.items():
            run_dir = os.path.join(work, f"{mode}{repeat}")
            events.clear()
            status = trainer.train(config.compose([*common, *extra, f"trainer.dir={run_dir}"]))
            assert status == "completed", status
            steps = [e for e in events if e[0] == "step"]
            saves = [e for e in events if e[0] == "save"][:-1]  # the last is the run's final (synchronous) save
            periodic = {s for s in range(args["every"], args["steps"], args["every"])} if mode != "none" else set()
            iterations = {i + 1: steps[i + 1][1] - steps[i][1] for i in range(len(steps) - 1)}
            plain = [t for s, t in iterations.items() if s not in periodic]
            saving = [t for s, t in iterations.items() if s in periodic]
            size = 0
            if rank == 0 and mode != "none":
                ckpt = os.path.join(run_dir, "checkpoints", f"step_{args['steps']:07d}")  # the final save
                size = sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file())
            row = out.setdefault(mode, {"loop_s": [], "iteration_s": [], "iteration_with_save_s": [],
                                        "in_save_call_s": [], "waiting_s": [], "checkpoint_mib": 0.0})
            row["loop_s"].append(steps[-1][2] - steps[0][1])
            row["iteration_s"] += plain
            row["iteration_with_save_s"] += saving
            row["in_save_call_s"] += [e[2] - e[1] for e in saves]
            row["waiting_s"].append(sum(e[2] - e[1] for e in events if e[0] in ("poll", "wait")))
            row["checkpoint_mib"] = size / 2**20
            if rank == 0:
                shutil.rmtree(run_dir, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--moe-width", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    from qwenvl_mcore.testing.dist import run_on_ranks

    work = tempfile.mkdtemp(prefix="qwenvl-bench-async-save-")
    try:
        out = run_on_ranks(_rank_fn, args.ranks, work, vars(args))[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    print(f"\n{args.ranks} rank(s), debug model with moe width {args.moe_width}, {args.steps} steps, periodic saves "
          f"every {args.every} (checkpoint {out['sync']['checkpoint_mib']:.0f} MiB per save), {os.cpu_count()} CPUs")
    print(f"{'mode':<6} {'loop s':>8} {'iteration s':>12} {'with save s':>12} {'in save call s':>15} {'waiting s':>10}")
    summary = {}
    for mode, row in out.items():
        summary[mode] = {"loop_s": med(row["loop_s"]), "iteration_s": med(row["iteration_s"]),
                         "iteration_with_save_s": med(row["iteration_with_save_s"]),
                         "in_save_call_s": med(row["in_save_call_s"]), "waiting_s": med(row["waiting_s"]),
                         "checkpoint_mib": row["checkpoint_mib"]}
        s = summary[mode]
        print(f"{mode:<6} {s['loop_s']:>8.2f} {s['iteration_s']:>12.3f} {s['iteration_with_save_s']:>12.3f} "
              f"{s['in_save_call_s']:>15.3f} {s['waiting_s']:>10.3f}")
    print(json.dumps({"args": vars(args), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
