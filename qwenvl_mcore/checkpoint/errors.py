"""The error every checkpoint reader raises (model_io re-exports it): the message names the checkpoint, the file
and the fix."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the problem and the fix."""
