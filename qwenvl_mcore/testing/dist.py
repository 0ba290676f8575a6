"""Run one function on N gloo ranks (CPU) and collect each rank's return value: the tests' name for the
production launcher in qwenvl_mcore/parallel/spawn.py.

One launch serves many checks: the function runs all of them and returns a dict of results that pytest tests
then assert on. Exceptions on any rank are re-raised in the caller with the rank's traceback.
"""

from __future__ import annotations

from qwenvl_mcore.parallel.spawn import RankError, free_port, run_on_ranks

__all__ = ["RankError", "free_port", "run_on_ranks"]
