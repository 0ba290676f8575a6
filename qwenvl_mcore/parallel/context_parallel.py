"""Context parallelism (parallel.cp): splitting packed rows over the CP ranks and attention across them.

Not implemented yet: `layout_problem` refuses cp > 1 so that a layout asking for it fails up front.
"""

from __future__ import annotations


def layout_problem(cp: int) -> str | None:
    """Why a layout with this context-parallel size cannot run, naming the fix; None when it can."""
    if cp > 1:
        return (f"parallel.cp={cp}: context parallelism is not supported by this release; set parallel.cp=1 "
                "(use sequence_parallel with tp for long sequences).")
    return None
