#!/usr/bin/env python
"""Export a megatron checkpoint (converted, or saved by the trainer at any layout, optimizer state included)
to an HF directory that transformers (4.57 and 5.x) and vLLM load.

    python tools/convert/mcore2hf.py --mcore DIR --out DIR [--max-shard-size 5GB] [--dtype bf16|fp16|fp32]
                                     [--expert-layout released|transformers5] [--config DIR] [--procs N] [--overwrite]
                                     [--adapter-only [--base-model-name NAME] | --merge-lora [--base DIR]]

--mcore is a checkpoint directory or a training save directory (its `latest` is used). Experts are written in
the released fused layout unless asked otherwise. --config checks the checkpoint against another config.json
(default: the one the checkpoint carries). The output is renamed into place only when complete.

A LoRA checkpoint (peft=lora: adapters only) needs one of
  --adapter-only  an HF PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for
                  peft.PeftModel.from_pretrained on the base; --dtype casts the adapters (default: as stored);
                  --base-model-name sets its base_model_name_or_path (default: the HF directory the base came from)
  --merge-lora    a full HF checkpoint: the base (the checkpoint's reference, or --base DIR, a moved copy with the
                  same hash) with W + scale * B @ A merged in fp32, cast to the stored dtype (or --dtype)
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
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--adapter-only", action="store_true", help="LoRA checkpoint -> HF PEFT adapter directory")
    lora.add_argument("--merge-lora", action="store_true", help="LoRA checkpoint -> base with the adapters merged")
    p.add_argument("--base", help="--merge-lora: the base checkpoint, when it moved (its hash must match)")
    p.add_argument("--base-model-name", help="--adapter-only: adapter_config.json's base_model_name_or_path")
    a = p.parse_args(argv)
    if a.base and not a.merge_lora:
        p.error("--base goes with --merge-lora")
    if a.base_model_name and not a.adapter_only:
        p.error("--base-model-name goes with --adapter-only")

    from qwenvl_mcore import library_noise

    library_noise.install()  # before torch and megatron load: known library notices stay off the console
    from qwenvl_mcore.conversion.convert import mcore_to_hf, run_cli

    if a.adapter_only:
        from qwenvl_mcore.lora.export import export_adapter

        return run_cli(export_adapter, mcore=a.mcore, out=a.out, dtype=a.dtype, base_model_name=a.base_model_name,
                       overwrite=a.overwrite, progress=not a.no_progress)
    if a.merge_lora:
        from qwenvl_mcore.lora.export import merge_lora

        return run_cli(merge_lora, mcore=a.mcore, out=a.out, base=a.base, config_dir=a.config, dtype=a.dtype,
                       expert_layout=a.expert_layout, max_shard_size=a.max_shard_size, procs=a.procs,
                       overwrite=a.overwrite, progress=not a.no_progress)
    return run_cli(mcore_to_hf, mcore=a.mcore, out=a.out, config_dir=a.config, dtype=a.dtype,
                   expert_layout=a.expert_layout, max_shard_size=a.max_shard_size, procs=a.procs,
                   overwrite=a.overwrite, progress=not a.no_progress)


if __name__ == "__main__":
    sys.exit(main())
