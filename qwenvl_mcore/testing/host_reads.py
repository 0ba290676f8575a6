"""Counting the reads of tensor values on the host: what would block the host on a GPU (tests of sync-free paths)."""

from __future__ import annotations

from torch.overrides import TorchFunctionMode

# the Python-level reads of a tensor's values (`if t:`, `int(t)`, `t.tolist()`, ... all go through one of these)
HOST_READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostReads(TorchFunctionMode):
    """While active, `reads` lists the name of every host read of a tensor's values, in order."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))
