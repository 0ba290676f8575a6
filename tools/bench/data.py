"""Data pipeline throughput: samples/s through the trainer's own loader (parse, decode, processor, pack) for an
image dataset and a video dataset, with 1, 2 and 4 DataLoader workers. Prints one line per case and a JSON summary.

    .venv/bin/python tools/bench/data.py [--samples 64] [--steps 6] [--workers 1 2 4] [--out /tmp/qwenvl-data-bench]

Media are generated locally (tools/data/make_sample_dataset.py's generator) at realistic sizes: images of
448-896 px per side, MP4 videos of 16-32 frames at 4 fps. The processor has the released Qwen3-VL pixel budgets
(images 256x256 .. 4096x4096 px, videos sampled at 2 fps) with the tiny local tokenizer (text cost is negligible).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from qwenvl_mcore.data.mixing import DatasetSpec, MixedDataset
from qwenvl_mcore.data.pipeline import BatchShape, StepBatches, step_loader
from qwenvl_mcore.data.render import Renderer, RenderOptions
from qwenvl_mcore.data.sample_data import write_sample_dataset
from qwenvl_mcore.data.sampler import GlobalBatchSampler
from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
from qwenvl_mcore.testing import tiny

# The released Qwen3-VL processor budgets (preprocessor_config.json / video_preprocessor_config.json).
IMAGE_PIXELS = (65536, 16777216)
VIDEO_PIXELS = (4096, 25165824)


def write_kind(root: str, kind: str, samples: int) -> str:
    """A JSONL of `samples` single-image (or single-video) questions over freshly generated media."""
    media_root = os.path.join(root, "media")
    if not os.path.exists(os.path.join(media_root, "manifest.json")):
        write_sample_dataset(media_root, num_samples=max(samples, 40), seed=0, formats=("messages",),
                             image_sides=(448, 896), video_frames=(16, 32), video_fps=4.0)
    with open(os.path.join(media_root, "manifest.json")) as f:
        media = json.load(f)["media"]
    paths = sorted(p for p, m in media.items() if m["type"] == ("image" if kind == "image" else "video"))
    out = os.path.join(root, f"{kind}.jsonl")
    with open(out, "w") as f:
        for i in range(samples):
            path = os.path.join(media_root, paths[i % len(paths)])
            tag, key = ("<image>", "images") if kind == "image" else ("<video>", "videos")
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{tag}What is shown here?"},
                                             {"role": "assistant", "content": "Shapes on a plain background."}],
                                key: [path]}) + "\n")
    return out


def bench(path: str, workers: int, *, steps: int, batch: int, seq_length: int) -> dict:
    processor = tiny.build_processor(tiny.build_tokenizer(), min_pixels=IMAGE_PIXELS[0], max_pixels=IMAGE_PIXELS[1],
                                     video_min_pixels=VIDEO_PIXELS[0], video_max_pixels=VIDEO_PIXELS[1])
    dataset = MixedDataset([DatasetSpec(path)], Renderer(processor, RenderOptions()))
    args = args_from_hf_config(flavor_hf_config("debug"))
    shape = BatchShape.of(args, processor.tokenizer.pad_token_id, seq_length=seq_length, packing=True,
                          micro_batch_size=1)
    sampler = GlobalBatchSampler(len(dataset), batch, seed=0)
    loader = step_loader(StepBatches(dataset, sampler, shape, dp_rank=0, dp_size=1, tokenizer=processor.tokenizer),
                         0, num_workers=workers, prefetch=2)
    next(loader)  # worker start-up and the first step are not counted
    start = time.perf_counter()
    samples = tokens = skipped = 0
    for _ in range(steps):
        step = next(loader)
        samples += len(step.lengths)
        tokens += sum(step.lengths)
        skipped += len(step.skips)
    elapsed = time.perf_counter() - start
    del loader
    return {"samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed, "samples": samples,
            "skipped": skipped, "mean_tokens": tokens / max(samples, 1), "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/qwenvl-data-bench")
    parser.add_argument("--samples", type=int, default=64, help="records per dataset")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    opts = parser.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    results = []
    print(f"cpu cores: {os.cpu_count()}; {opts.steps} steps of {opts.batch} samples, packed into {opts.seq_length}")
    for kind in ("image", "video"):
        path = write_kind(opts.out, kind, opts.samples)
        for w in opts.workers:
            r = bench(path, w, steps=opts.steps, batch=opts.batch, seq_length=opts.seq_length)
            r.update(kind=kind, workers=w)
            results.append(r)
            print(f"{kind:5s} workers={w}: {r['samples_per_s']:7.1f} samples/s, {r['tokens_per_s']:9.0f} tokens/s "
                  f"({r['mean_tokens']:.0f} tokens/sample, {r['skipped']} skipped)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
