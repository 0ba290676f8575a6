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


def refusal(fn) -> str | None:
    """Run fn(); the configuration or checkpoint error it stops with, as "Type: message", or None if it ran."""
    from qwenvl_mcore.checkpoint import model_io
    from qwenvl_mcore.training import config

    try:
        fn()
    except (config.ConfigError, model_io.CheckpointError) as e:
        return f"{type(e).__name__}: {e}"
    return None
