#!/usr/bin/env python
"""Check our megatron model against transformers on an HF Qwen3-VL MoE checkpoint, at a chosen parallel layout.

    python tools/convert/verify.py --hf DIR [--mcore DIR] [--adapter DIR] [--tp N --ep N --etp N --pp N]
                                   [--first-stage-layers N] [--last-stage-layers N] [--dtype fp32|bf16]

Starts its own ranks (gloo on the CPU, one process per rank), runs transformers on --hf and our model on the same
weights (read from --hf, or from the megatron checkpoint --mcore converted from it) and a built-in
text + image + video sample, and prints as its last line a JSON object with max_abs_logit_diff,
logit_cosine and top1_agreement (plus the loss difference and the layout).

--adapter DIR adds an HF PEFT LoRA adapter (mcore2hf --adapter-only writes one) to both: transformers through
peft.PeftModel.from_pretrained (the reference; this tool needs peft then), ours through apply_lora and the
adapter's tensors (qwenvl_mcore.lora.peft_io). The adapter must be one for Qwen3-VL MoE (checked first, exit 2).

--first-stage-layers / --last-stage-layers give the first / last pipeline stage their own LLM layer counts (uneven
stages, as parallel.first_stage_layers / parallel.last_stage_layers); an impossible split exits 2 naming the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rank(rank: int, world: int, hf_dir: str, mcore_dir: str | None, layout_kwargs: dict, dtype_name: str,
          adapter: str | None = None) -> dict:
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    from qwenvl_mcore.checkpoint.model_io import load_model
    from qwenvl_mcore.conversion import engine
    from qwenvl_mcore.conversion.hf_io import SafetensorsReader
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, load_hf_config
    from qwenvl_mcore.models.qwen3_vl_moe.hf_mapping import Context
    from qwenvl_mcore.models.qwen3_vl_moe.model import build_model_chunks
    from qwenvl_mcore.parallel import ParallelLayout, device, init_distributed
    from qwenvl_mcore.testing import parity, tiny

    dtype = DTYPES[dtype_name]
    layout = ParallelLayout(**layout_kwargs)
    init_distributed(layout)
    args = args_from_hf_config(load_hf_config(hf_dir))
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype)
    if adapter:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter).get_base_model()  # the adapters stay in its modules
    hf = hf.eval().to(device())
    processor = AutoProcessor.from_pretrained(hf_dir)
    batch = tiny.sample_inputs(processor, "image_video").to(device())
    chunks = [c.to(device()).eval() for c in build_model_chunks(args, layout, dtype=dtype)]
    if mcore_dir:
        load_model(mcore_dir, chunks)
    else:
        reader = SafetensorsReader(hf_dir)
        for chunk in chunks:
            engine.load_hf_weights(chunk, reader.get, Context(args))
    if adapter:
        from qwenvl_mcore.lora import adapter_dir
        from qwenvl_mcore.lora.apply import apply_lora

        what = f"--adapter {adapter}"
        config, shapes = adapter_dir.read_adapter(adapter, what=what)
        lora = adapter_dir.adapter_settings(adapter, config, shapes, what=what)
        apply_lora(chunks, dataclasses.replace(lora, dropout=0.0), init=False)  # eval: no dropout either way
        adapter_dir.load_init_adapter(chunks, args, adapter, what=what)
    report = parity.compare_forward(chunks, hf, batch)  # None except on the last pipeline stage
    if report is not None:
        report.update(layout=layout.as_dict(), world_size=world, dtype=dtype_name, adapter=adapter)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors, processor files)")
    p.add_argument("--mcore", help="megatron checkpoint converted from --hf (or a training save directory)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--first-stage-layers", type=int, default=None,
                   help="LLM layers on the first pipeline stage (uneven stages; default: an even share)")
    p.add_argument("--last-stage-layers", type=int, default=None,
                   help="LLM layers on the last pipeline stage (uneven stages; default: an even share)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--adapter", help="HF PEFT LoRA adapter directory, applied to both models")
    a = p.parse_args(argv)

    from qwenvl_mcore import library_noise

    library_noise.install()  # before megatron loads (--adapter's checks import it): known notices off the console
    from qwenvl_mcore.checkpoint.model_io import CheckpointError, read_info, resolve_checkpoint_dir
    from qwenvl_mcore.lora.config import LoRAConfigError
    from qwenvl_mcore.models.qwen3_vl_moe.config import ModelConfigError, args_from_hf_config, load_hf_config
    from qwenvl_mcore.models.qwen3_vl_moe.layout_checks import validate_layout
    from qwenvl_mcore.parallel import LayoutError, ParallelLayout
    from qwenvl_mcore.testing.dist import run_on_ranks

    layout = ParallelLayout(tp=a.tp, pp=a.pp, ep=a.ep, etp=a.etp, sequence_parallel=a.tp > 1,
                            first_stage_layers=a.first_stage_layers, last_stage_layers=a.last_stage_layers)
    world = math.lcm(a.tp, a.ep * a.etp) * a.pp
    mcore = None
    try:
        validate_layout(args_from_hf_config(load_hf_config(a.hf)), layout, world)
        if a.mcore:
            mcore = resolve_checkpoint_dir(a.mcore)
            read_info(mcore)
        if a.adapter:
            from qwenvl_mcore.lora import adapter_dir

            what = f"--adapter {a.adapter}"
            config, shapes = adapter_dir.read_adapter(a.adapter, what=what)
            adapter_dir.adapter_settings(a.adapter, config, shapes, what=what).validate()
    except (LayoutError, ModelConfigError, CheckpointError, LoRAConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = next(r for r in run_on_ranks(_rank, world, a.hf, mcore, layout.as_dict(), a.dtype, a.adapter)
                  if r is not None)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
