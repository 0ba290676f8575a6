"""Parallel layout, process groups and the CPU-compatibility layer."""

from qwenvl_mcore.parallel.distributed import destroy_distributed, device, init_distributed
from qwenvl_mcore.parallel.layout import LayoutError, ParallelLayout

__all__ = ["ParallelLayout", "LayoutError", "init_distributed", "destroy_distributed", "device"]
