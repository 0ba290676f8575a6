#!/usr/bin/env python
"""Export a megatron checkpoint (converted, or saved by the trainer at any layout, optimizer state included)
to an HF directory that transformers (4.57 and 5.x) and vLLM load.

    python tools/convert/mcore2hf.py --mcore DIR --out DIR [--max-shard-size 5GB] [--dtype bf16|fp16|fp32]
                                     [--expert-layout released|transformers5] [--config DIR] [--procs N] [--overwrite]

--mcore is a checkpoint directory or a training save directory (its `latest` is used). Experts are written in
the released fused layout unless asked otherwise. --config checks the checkpoint against another config.json
(default: the one the checkpoint carries). The output is renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore", required=True, help="megatron checkpoint (or training save directory)")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the checkpoint's)")
    p.add_argument("--expert-layout", default="released", choices=["released", "transformers5"])
    p.add_argument("--config", help="config.json (or its directory) the checkpoint must fit")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from qwenvl_mcore import library_noise

    library_noise.install()  # before torch and megatron load: known library notices stay off the console
    from qwenvl_mcore.conversion.convert import mcore_to_hf, run_cli

    return run_cli(mcore_to_hf, mcore=a.mcore, out=a.out, config_dir=a.config, dtype=a.dtype,
                   expert_layout=a.expert_layout, max_shard_size=a.max_shard_size, procs=a.procs,
                   overwrite=a.overwrite, progress=not a.no_progress)


if __name__ == "__main__":
    sys.exit(main())
