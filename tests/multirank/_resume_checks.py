"""Rank function for tests/multirank/test_trainer.py: load a training checkpoint at a layout (the trainer's own
resume path) and save it again at once, so the state it loaded can be compared with the one it was saved from."""

from __future__ import annotations

from qwenvl_mcore.training import config, trainer


def load_and_resave(rank: int, world: int, overrides: list[str], out_dir: str) -> str:
    """Resume the run `overrides` describe (its checkpoint.dir's latest) and save it, unchanged, under `out_dir`."""
    cfg = config.compose(overrides)
    start = trainer.start_run(cfg)
    try:
        run = trainer.build_run(cfg, start)
        run.cfg.checkpoint.dir = out_dir
        return trainer.save_training_checkpoint(run)
    finally:
        start.release()
