"""Test support around the trainer: run it and keep what it built."""

from __future__ import annotations


def train_keeping_run(cfg) -> tuple[str, object]:
    """trainer.train(cfg), and the Run it built (to look at the model and optimizer after the last step)."""
    from qwenvl_mcore.training import trainer

    kept = {}
    build = trainer.build_run

    def keep(*args, **kwargs):
        kept["run"] = build(*args, **kwargs)
        return kept["run"]

    trainer.build_run = keep
    try:
        status = trainer.train(cfg)
    finally:
        trainer.build_run = build
    return status, kept["run"]
