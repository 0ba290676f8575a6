"""Rank function for tests/multirank/test_trainer.py: load a training checkpoint at a layout (the trainer's own
resume path) and save it again at once, so the state it loaded can be compared with the one it was saved from.
The same launch then runs the lean optimizer step's multi-rank checks (testing/optimizer_steps.compare_steps)."""

from __future__ import annotations

from qwenvl_mcore.training import config, trainer


def load_and_resave(rank: int, world: int, overrides: list[str], out_dir: str, step_cases: dict | None = None) -> dict:
    """Resume the run `overrides` describe (its checkpoint.dir's latest) and save it, unchanged, under `out_dir`:
    {"resaved": the step directory written}. Then, in the same processes, the lean optimizer step against
    megatron's for each of `step_cases` (name -> (layout kwargs, compare_steps keywords)): under "optimizer_steps"."""
    cfg = config.compose(overrides)
    start = trainer.start_run(cfg)
    try:
        run = trainer.build_run(cfg, start)
        run.cfg.checkpoint.dir = out_dir
        out = {"resaved": trainer.save_training_checkpoint(run)}
    finally:
        start.release()
    if step_cases:
        from qwenvl_mcore.testing.optimizer_steps import compare_steps

        out["optimizer_steps"] = {name: compare_steps(layout, **kwargs) for name, (layout, kwargs) in step_cases.items()}
    return out
