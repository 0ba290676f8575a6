"""Per-GPU memory of a training run by category, and the largest micro-batch that fits (docs/memory.md).

    .venv/bin/python tools/plan_memory.py experiment=sft_30b_a3b_1x8xh100 [Hydra overrides] [--gpu-gib 80] [--json]
    .venv/bin/python tools/plan_memory.py --all              # every preset in conf/experiment, then a summary
    .venv/bin/python tools/plan_memory.py --presets          # the README's table of presets (what each fits)

The model of memory is qwenvl_mcore/training/memory.py; this file only parses arguments and prints.
Exit status: 0 when every planned run fits under --fraction of --gpu-gib, 1 when one does not, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=sft_30b_a3b_1x8xh100 data.seq_length=8192")
    p.add_argument("--all", action="store_true", help="plan every experiment preset (overrides apply to each)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    p.add_argument("--fraction", type=float, default=0.9, help="usable share of the GPU (default 0.9)")
    p.add_argument("--gpus", type=int, default=None,
                   help="world size; default: from the run name (1x8xh100 = 8), else the smallest the layout needs")
    p.add_argument("--image-share", type=float, default=0.25,
                   help="visual tokens / tokens of a micro-batch for the ViT's activations (default 0.25)")
    p.add_argument("--moe-imbalance", type=float, default=1.0,
                   help="tokens routed to the busiest expert-parallel rank / the mean (default 1.0)")
    p.add_argument("--adam", choices=("fused", "torch"), default="fused",
                   help="fused: torch's fused Adam (what the trainer uses on the GPU) or Apex/Transformer-Engine's "
                        "(no step temporary); torch: torch's foreach Adam (megatron's default without that switch), "
                        "whose "
                        "fp32 temporary of the largest parameter group's shard counts at the optimizer step")
    p.add_argument("--json", action="store_true", help="print JSON (every stage, bytes) instead of tables")
    p.add_argument("--presets", action="store_true",
                   help="print the README's table of presets: hardware, layout, what trains, the sequence length "
                        "and per-GPU memory (GPU-less presets left out)")
    return p


MODELS = {"qwen3_vl_30b_a3b": "Qwen3-VL-30B-A3B", "qwen3_vl_235b_a22b": "Qwen3-VL-235B-A22B"}


def presets_table(rows) -> str:
    """The README's table: one row per (name, cfg, plan) of a preset for real GPUs (a released model's flavor)."""
    out = ["| preset | model | GPUs | layout | trains | packed tokens: preset / longest that fits | GiB per GPU |",
           "|---|---|---|---|---|---|---|"]
    for name, cfg, p in rows:
        lay = p.layout
        layout = " ".join(f"{k}{lay[k]}" for k in ("tp", "pp", "ep", "etp", "cp") if (lay.get(k) or 1) > 1)
        layout += " sp" if lay.get("sequence_parallel") else ""
        if cfg.peft.method == "lora":
            targets = ("every linear but the router" if list(cfg.peft.targets) == ["all"]
                       else ", ".join(cfg.peft.targets))
            trains = f"LoRA rank {cfg.peft.rank} on {targets}; base frozen"
        else:
            frozen = [part for part in ("vision", "merger", "language") if cfg.model[f"freeze_{part}"]]
            trains = "everything" + (f" but {', '.join(frozen)}" if frozen else "")
        longest = f"{p.largest:,}{'+' if p.largest_capped else ''}"
        out.append(f"| `{name}` | {MODELS[cfg.model.flavor]} | {p.world_size} x {int(p.gpu_gib)} GiB | {layout} | "
                   f"{trains} | {cfg.data.seq_length:,} / {longest} | {p.worst['total'] / 2**30:.1f} of "
                   f"{p.budget / 2**30:.0f} |")
    return "\n".join(out)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    from qwenvl_mcore.training import memory
    from qwenvl_mcore.training.config import CONF_DIR, ConfigError, compose

    if args.all or args.presets:
        names = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
        runs = [[f"experiment={n}", *[o for o in args.overrides if not o.startswith("experiment=")]] for n in names]
    else:
        if not any(o.startswith("experiment=") for o in args.overrides):
            print("plan_memory: give experiment=<preset> (and any overrides), or --all", file=sys.stderr)
            return 2
        runs = [args.overrides]
    plans, cfgs = [], []
    for overrides in runs:
        try:
            cfg = compose(overrides)
            shape = memory.from_config(cfg, world_size=args.gpus, image_share=args.image_share,
                                       moe_imbalance=args.moe_imbalance, adam=args.adam)
        except (ConfigError, ValueError) as e:
            print(f"plan_memory: {' '.join(overrides)}: {e}", file=sys.stderr)
            return 2
        plans.append(memory.plan(shape, gpu_gib=args.gpu_gib, fraction=args.fraction))
        cfgs.append(cfg)
    if args.presets:
        print(presets_table([(run[0].split("=", 1)[1], cfg, p) for run, cfg, p in zip(runs, cfgs, plans)
                             if cfg.model.flavor in MODELS]))
        return 0 if all(p.fits for p in plans) else 1
    if args.json:
        print(json.dumps([p.as_dict() for p in plans] if args.all else plans[0].as_dict(), indent=1))
    else:
        print(f"GiB per GPU; budget {args.fraction:.0%} of {args.gpu_gib:g} GiB. Command: tools/plan_memory.py "
              + " ".join((["--all"] if args.all else []) + args.overrides))
        for p in plans:
            print()
            print(memory.format_plan(p))
        if len(plans) > 1:
            print("\nSummary (worst stage of each run):\n")
            print(memory.format_summary(plans))
    return 0 if all(p.fits for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
