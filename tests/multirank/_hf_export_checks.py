"""Rank function for the save_hf tests: transformers on an exported HF directory against our model loaded from the
training checkpoint it was exported with (tools/convert/verify.py's own comparison, one rank)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hf_vs_checkpoint(rank: int, world: int, pairs: list[tuple[str, str]]) -> list[dict]:
    """verify.py --hf <hf_dir> --mcore <ckpt> at TP = EP = PP = 1, fp32, for each (hf_dir, ckpt) in one process:
    their reports (max_abs_logit_diff, top1_agreement, ...)."""
    sys.path.insert(0, str(ROOT / "tools" / "convert"))
    import verify

    return [verify._rank(rank, world, hf_dir, ckpt, {}, "fp32") for hf_dir, ckpt in pairs]
