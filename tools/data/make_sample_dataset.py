#!/usr/bin/env python
"""Write the local multimodal SFT sample dataset (see :mod:`qwenvl_mcore.data.sample_data`) and print a summary.

    python tools/data/make_sample_dataset.py --out DIR [--samples 64] [--seed 0] [--dirty-fraction 0.2]
        [--overlong-tokens 2048] [--formats messages sharegpt openai parquet]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Python puts this script's folder first on sys.path, where tools/data/inspect.py would shadow the standard library's
# inspect module (imported by torch and dataclasses) and break every import below.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from qwenvl_mcore.data.sample_data import SAMPLE_FORMATS, write_sample_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (new, empty, or a previous sample dataset)")
    parser.add_argument("--samples", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dirty-fraction", type=float, default=0.0, help="share of bad samples (default 0)")
    parser.add_argument("--overlong-tokens", type=int, default=0,
                        help="add one record per format with this many words of text (expected skip: too_long)")
    parser.add_argument("--formats", nargs="+", default=list(SAMPLE_FORMATS), choices=SAMPLE_FORMATS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = write_sample_dataset(args.out, num_samples=args.samples, seed=args.seed, formats=args.formats,
                                    dirty_fraction=args.dirty_fraction, overlong_tokens=args.overlong_tokens)
    elapsed = time.perf_counter() - start
    records = manifest["num_records"]
    print(f"wrote {records['total']} records to {args.out} in {elapsed:.2f} s (seed {args.seed})")
    for name in manifest["files"]:
        print(f"  {name}: {records[name]} records")
    media = manifest["media"].values()
    print(f"  media: {sum(m['type'] == 'image' for m in media)} images, {sum(m['type'] == 'video' for m in media)} "
          f"MP4 videos, {sum(m['type'] == 'frames' for m in media)} frame-list videos (intact files)")
    print(f"  clean records by kind: {manifest['kinds']}")
    skips = manifest["expected_skips"]
    print(f"  expected skips: {sum(skips.values())} {skips}" if skips else "  expected skips: none")
    return manifest


if __name__ == "__main__":
    main()
