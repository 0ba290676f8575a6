"""Look at the data exactly as a training run sees it (same config, same code path).

    python tools/data/inspect.py data.train=train.jsonl --sample 3          # one rendered sample
    python tools/data/inspect.py data.train=train.jsonl --bin 0             # the packed bins of step 0 (one DP rank)
    python tools/data/inspect.py experiment=sft_30b_a3b_1x8xh100 data.train=a.jsonl --summary [--limit 1000]

Any Hydra override of the training config applies (data.seq_length, data.image_max_pixels, data.train_on, ...).
A sample shows its text with trained spans in [[...]] (or green with --color), runs of vision pad tokens collapsed as
<|image_pad|>x16, each image/video grid with its token count, and the MRoPE position ids (t, h, w) at the start of
every text and vision block. --summary renders the entries and prints counts per file, a length histogram and the
skips by reason with their first locations.
"""

from __future__ import annotations

import sys

# This file's name shadows the standard library's `inspect` for everything imported below: drop its directory.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402

import torch  # noqa: E402

from qwenvl_mcore.data.build import datasets_from_config, processor_from_config  # noqa: E402
from qwenvl_mcore.data.collate import DataError  # noqa: E402
from qwenvl_mcore.data.pipeline import BatchShape, StepBatches, fit_length, media_spans  # noqa: E402
from qwenvl_mcore.data.sample import SkipSample  # noqa: E402
from qwenvl_mcore.data.sampler import GlobalBatchSampler  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX as IGNORE  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.rope import get_rope_index  # noqa: E402
from qwenvl_mcore.training.config import ConfigError, compose  # noqa: E402



def _tokens_text(ids: list[int], labels: list[int], tokenizer, color: bool) -> str:
    """The decoded sequence, trained spans marked, runs of one special pad token collapsed."""
    out, i = [], 0
    pads = {tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|endoftext|>")}
    while i < len(ids):
        trained = labels[i] != IGNORE
        j = i
        if ids[i] in pads:
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            piece = f"{tokenizer.convert_ids_to_tokens(ids[i])}x{j - i}"
        else:
            while j < len(ids) and (labels[j] != IGNORE) == trained and ids[j] not in pads:
                j += 1
            piece = tokenizer.decode(ids[i:j])
        if trained:
            piece = f"\033[32m{piece}\033[0m" if color else f"[[{piece}]]"
        out.append(piece)
        i = j
    return "".join(out)


def show_sample(sample, args, tokenizer, shape: BatchShape, color: bool) -> None:
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    print(f"entry {sample.index} at {sample.location}: {len(ids)} tokens, {sample.num_loss_tokens} trained "
          f"(data.seq_length={shape.seq_length})")
    for name, grid in (("image", sample.image_grid_thw), ("video", sample.video_grid_thw)):
        for k, g in enumerate([] if grid is None else grid.tolist()):
            merged = g[0] * g[1] * g[2] // args.vision.spatial_merge_size ** 2
            print(f"  {name} {k}: grid t,h,w = {g} patches -> {merged} tokens")
    print("  text ([[trained]]):")
    print("    " + _tokens_text(ids, labels, tokenizer, color).replace("\n", "\n    "))
    positions, _ = get_rope_index(
        sample.input_ids[None], sample.image_grid_thw, sample.video_grid_thw, None,
        image_token_id=args.image_token_id, video_token_id=args.video_token_id,
        vision_start_token_id=args.vision_start_token_id, spatial_merge_size=args.vision.spatial_merge_size)
    starts = sorted({0, *[s for s, _, _ in media_spans(sample, shape)], *[e for _, e, _ in media_spans(sample, shape)]})
    print("  MRoPE (t, h, w) at block starts: " + ", ".join(
        f"{p}:{tuple(positions[:, 0, p].tolist())}" for p in starts if p < len(ids)))


def show_bin(steps: StepBatches, step_index: int, tokenizer) -> None:
    consumed = step_index * steps.sampler.global_batch_size
    step = steps[consumed]
    print(f"step {step_index} (stream position {consumed}): entries {step.indices}, {len(step.skips)} skipped, "
          f"{len(step.microbatches)} micro-batches")
    for reason, location, detail in step.skips:
        print(f"  skipped {reason} at {location}: {detail}")
    for k, mb in enumerate(step.microbatches):
        real = int(mb.attention_mask.sum())
        cu = None if getattr(mb, "cu_seqlens", None) is None else mb.cu_seqlens.tolist()
        print(f"  micro-batch {k}: shape {tuple(mb.input_ids.shape)}, {real} real tokens, "
              f"{int((mb.labels != IGNORE).sum())} trained, cu_seqlens {cu}")
        if cu is not None and mb.position_ids is not None:
            for a, b in zip(cu[:-1], cu[1:]):
                pos = mb.position_ids[:, 0]
                print(f"    sample tokens [{a}, {b}): MRoPE first {tuple(pos[:, a].tolist())}, "
                      f"last {tuple(pos[:, b - 1].tolist())}")


def summary(dataset, shape: BatchShape, tokenizer, limit: int | None) -> None:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    lengths, skips, per_file = [], defaultdict(list), Counter()
    for i in range(n):
        item = dataset[i]
        try:
            if isinstance(item, SkipSample):
                raise item
            fit_length(item, shape, tokenizer)
        except SkipSample as skip:
            skips[skip.reason].append(skip.location)
            continue
        lengths.append(len(item))
        per_file[item.location.rsplit(":", 1)[0]] += 1
    print(f"{n} of {len(dataset)} entries rendered: {len(lengths)} usable, {n - len(lengths)} skipped")
    for f, c in per_file.items():
        print(f"  {c:8d}  {f}")
    if lengths:
        t = torch.tensor(lengths, dtype=torch.float64)
        print(f"tokens per sample: min {int(t.min())}, mean {float(t.mean()):.1f}, max {int(t.max())} "
              f"(data.seq_length={shape.seq_length})")
        edges = torch.linspace(0, max(shape.seq_length, int(t.max())), 11, dtype=torch.float64)
        counts = torch.histogram(t, bins=edges).hist.long().tolist()
        for lo, hi, c in zip(edges[:-1].tolist(), edges[1:].tolist(), counts):
            print(f"  [{int(lo):6d}, {int(hi):6d}) {c:7d} {'#' * min(60, c * 60 // max(counts))}")
    for reason, where in sorted(skips.items()):
        print(f"skipped {reason}: {len(where)} (first: {', '.join(where[:3])})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--sample", type=int, help="dataset entry to render")
    what.add_argument("--bin", type=int, help="step whose micro-batches (packed bins) to show, for DP rank 0 of 1")
    what.add_argument("--summary", action="store_true", help="render every entry (or --limit) and summarise")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--valid", action="store_true", help="inspect data.valid instead of data.train")
    parser.add_argument("--color", action="store_true", help="trained spans in green instead of [[...]]")
    opts, overrides = parser.parse_known_args(argv)
    try:
        cfg = compose(overrides)
        processor = processor_from_config(cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # a missing file, data.strict=true on a bad sample, data.overlong=error: the run's own errors, exit 2
        args = args_from_hf_config(flavor_hf_config(cfg.model.flavor))
        train, valid = datasets_from_config(cfg.data, processor)
        dataset = valid if opts.valid else train
        if dataset is None:
            raise DataError("no validation data configured (data.valid / data.valid_samples)")
        d = cfg.data
        shape = BatchShape.of(args, processor.tokenizer.pad_token_id, seq_length=d.seq_length, packing=d.packing,
                              micro_batch_size=d.micro_batch_size, overlong=d.overlong)
        tokenizer = processor.tokenizer
        if opts.summary:
            summary(dataset, shape, tokenizer, opts.limit)
        elif opts.bin is not None:
            sampler = GlobalBatchSampler(len(dataset), d.global_batch_size, seed=d.seed, shuffle=d.shuffle)
            show_bin(StepBatches(dataset, sampler, shape, dp_rank=0, dp_size=1, tokenizer=tokenizer), opts.bin,
                     tokenizer)
        else:
            index = opts.sample or 0
            item = dataset[index]
            if isinstance(item, SkipSample):
                print(f"entry {index} is skipped: {item}")
                return 1
            show_sample(item, args, tokenizer, shape, opts.color)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
