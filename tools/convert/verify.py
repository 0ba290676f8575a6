#!/usr/bin/env python
"""Check our megatron model against transformers on an HF Qwen3-VL MoE checkpoint, at a chosen parallel layout.

    python tools/convert/verify.py --hf DIR [--mcore DIR] [--adapter DIR] [--tp N --ep N --etp N --pp N --cp N]
                                   [--ranks N]
                                   [--first-stage-layers N] [--last-stage-layers N] [--dtype fp32|bf16]
                                   [--packed] [--data FILE [--samples N]]

Starts its own ranks (gloo on the CPU, one process per rank), runs transformers on --hf and our model on the same
weights (read from --hf, or from the megatron checkpoint --mcore converted from it) and a built-in
text + image + video sample, and prints as its last line a JSON object with max_abs_logit_diff,
logit_cosine and top1_agreement (plus the loss difference and the layout).

--adapter DIR adds an HF PEFT LoRA adapter (mcore2hf --adapter-only writes one) to both: transformers through
peft.PeftModel.from_pretrained (the reference; this tool needs peft then), ours through apply_lora and the
adapter's tensors (qwenvl_mcore.lora.peft_io). The adapter must be one for Qwen3-VL MoE (checked first, exit 2).

--first-stage-layers / --last-stage-layers give the first / last pipeline stage their own LLM layer counts (uneven
stages, as parallel.first_stage_layers / parallel.last_stage_layers); an impossible split exits 2 naming the fix.

--cp N splits every row over N context-parallel ranks (parallel.cp). verify starts lcm(tp*cp, ep*etp) * pp ranks,
or --ranks N (the rest data parallelism; refused, exit 2, when tp*pp*cp or ep*etp*pp does not divide it).

--packed feeds training samples (rendered with training's labels: the assistant answers) packed into one row, as
data.packing packs them (attention within each sample, MRoPE positions per sample), and compares each sample's
logits and loss with transformers run on that sample alone; the JSON adds loss_rel_diff,
max_sample_loss_rel_diff, samples, tokens and rows. Without --data the samples are built in: an image + video, a
text, an image and a video conversation.

--data FILE [--samples N] (default 4) takes the first N usable records of a dataset file (JSONL in the messages /
ShareGPT / OpenAI formats, or parquet; skipped records are listed on stderr), rendered by --hf's processor as
training renders them (data.* defaults), each alone as a one-row micro-batch, or packed into one row with --packed.
A missing file, a file without a usable record or --samples < 1 exits 2 naming the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rank(rank: int, world: int, hf_dir: str, mcore_dir: str | None, layout_kwargs: dict, dtype_name: str,
          adapter: str | None = None, samples: list | None = None, packed: bool = False) -> dict:
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
    batch = tiny.sample_inputs(processor, "image_video").to(device()) if samples is None else None
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
    if samples is None:
        report = parity.compare_forward(chunks, hf, batch)  # None except on the last pipeline stage
    else:
        from qwenvl_mcore.testing.sample_parity import compare_samples

        report = compare_samples(chunks, hf, samples, packed=packed, pad_token_id=processor.tokenizer.pad_token_id)
    if report is not None:
        report.update(layout=layout.as_dict(), world_size=world, dtype=dtype_name, adapter=adapter, cp=layout.cp,
                      packed=packed)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors, processor files)")
    p.add_argument("--mcore", help="megatron checkpoint converted from --hf (or a training save directory)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks each row is split over")
    p.add_argument("--ranks", type=int, default=None,
                   help="processes to start (default: the fewest the layout needs, lcm(tp*cp, ep*etp)*pp); the rest "
                        "is data parallelism")
    p.add_argument("--first-stage-layers", type=int, default=None,
                   help="LLM layers on the first pipeline stage (uneven stages; default: an even share)")
    p.add_argument("--last-stage-layers", type=int, default=None,
                   help="LLM layers on the last pipeline stage (uneven stages; default: an even share)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--adapter", help="HF PEFT LoRA adapter directory, applied to both models")
    p.add_argument("--packed", action="store_true",
                   help="pack the samples into one row as training does (built-in samples unless --data)")
    p.add_argument("--data", help="dataset file (JSONL or parquet) whose first --samples usable records are checked")
    p.add_argument("--samples", type=int, default=None, help="records of --data to check (default 4)")
    a = p.parse_args(argv)

    from qwenvl_mcore import library_noise

    library_noise.install()  # before megatron loads (--adapter's checks import it): known notices off the console
    from qwenvl_mcore.checkpoint.model_io import CheckpointError, read_info, resolve_checkpoint_dir
    from qwenvl_mcore.lora.config import LoRAConfigError
    from qwenvl_mcore.models.qwen3_vl_moe.config import ModelConfigError, args_from_hf_config, load_hf_config
    from qwenvl_mcore.models.qwen3_vl_moe.layout_checks import validate_layout
    from qwenvl_mcore.parallel import LayoutError, ParallelLayout
    from qwenvl_mcore.testing.dist import run_on_ranks
    from qwenvl_mcore.testing.sample_parity import VerifyDataError, builtin_samples, dataset_samples

    layout = ParallelLayout(tp=a.tp, pp=a.pp, ep=a.ep, etp=a.etp, cp=a.cp, sequence_parallel=a.tp > 1,
                            first_stage_layers=a.first_stage_layers, last_stage_layers=a.last_stage_layers)
    mcore = samples = None
    try:
        if a.samples is not None and a.data is None:
            raise VerifyDataError(f"--samples {a.samples} needs --data FILE (the dataset whose records to check).")
        if a.samples is not None and a.samples < 1:
            raise VerifyDataError(f"--samples {a.samples}: give at least 1 (the number of records of --data to "
                                  "check).")
        if a.data is not None and not os.path.isfile(a.data):
            raise VerifyDataError(f"--data {a.data} does not exist or is not a file: give a JSONL (messages, "
                                  "ShareGPT or OpenAI format) or parquet dataset file.")
        layout.validate()  # the sizes themselves (--cp 0 ...) before the world size is computed from them
        world = math.lcm(a.tp * a.cp, a.ep * a.etp) * a.pp if a.ranks is None else a.ranks
        if world < 1:
            raise LayoutError(f"--ranks {world}: give a positive number of processes (or leave it out).")
        try:
            validate_layout(args_from_hf_config(load_hf_config(a.hf)), layout, world)
        except LayoutError as e:
            if a.ranks is None:
                raise
            raise LayoutError(f"{e} (verify.py: --ranks {a.ranks} must be a multiple of tp*pp*cp and of ep*etp*pp; "
                              f"leave --ranks out to start the {math.lcm(a.tp * a.cp, a.ep * a.etp) * a.pp} the layout "
                              "needs)") from None
        if a.mcore:
            mcore = resolve_checkpoint_dir(a.mcore)
            read_info(mcore)
        if a.adapter:
            from qwenvl_mcore.lora import adapter_dir

            what = f"--adapter {a.adapter}"
            config, shapes = adapter_dir.read_adapter(a.adapter, what=what)
            adapter_dir.adapter_settings(a.adapter, config, shapes, what=what).validate()
        if a.data is not None or a.packed:  # rendered here once; every rank gets the same samples
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(a.hf)
            if a.data is not None:
                samples, skipped = dataset_samples(a.data, processor, 4 if a.samples is None else a.samples)
                for line in skipped:
                    print(f"skipped {line}", file=sys.stderr)
                if a.samples is not None and len(samples) < a.samples:
                    print(f"note: --data {a.data} has {len(samples)} usable records, fewer than --samples "
                          f"{a.samples}; checking those", file=sys.stderr)
            else:
                samples = builtin_samples(processor)
    except (LayoutError, ModelConfigError, CheckpointError, LoRAConfigError, VerifyDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = next(r for r in run_on_ranks(_rank, world, a.hf, mcore, layout.as_dict(), a.dtype, a.adapter, samples,
                                          a.packed) if r is not None)
    if a.data is not None:
        report["data"] = a.data
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
