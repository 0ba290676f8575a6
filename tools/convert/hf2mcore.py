#!/usr/bin/env python
"""Convert an HF Qwen3-VL MoE directory into a megatron distributed checkpoint, loadable at any layout.

    python tools/convert/hf2mcore.py --hf DIR --out DIR [--dtype bf16|fp16|fp32] [--procs N] [--overwrite]

Reads config.json and the (sharded) safetensors, experts in the released or the transformers-5 layout, one
tensor at a time; N processes split the tensors. The output also holds the HF config and processor files
(under hf/). It is written to a staging directory and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors, processor files)")
    p.add_argument("--out", required=True, help="output megatron checkpoint directory")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="stored dtype (default: the HF weights')")
    p.add_argument("--procs", type=int, default=1, help="processes sharing the conversion (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from qwenvl_mcore import library_noise

    library_noise.install()  # before torch and megatron load: known library notices stay off the console
    from qwenvl_mcore.conversion.convert import hf_to_mcore, run_cli

    return run_cli(hf_to_mcore, hf_dir=a.hf, out=a.out, dtype=a.dtype, procs=a.procs, overwrite=a.overwrite,
                   progress=not a.no_progress)


if __name__ == "__main__":
    sys.exit(main())
