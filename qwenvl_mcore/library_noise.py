"""Known harmless messages of the libraries we build on, kept off the console and written once to a log file.

On our machines megatron-core, torch and torch's distributed checkpointing print the same few notices on every
rank and every run (no Transformer Engine, no CUDA runtime, deprecations of defaults we do not use). They made up
most of what a user read, and hid the lines that matter. Entry points call :func:`install` before importing those
libraries; the messages listed in :data:`KNOWN` are then recorded instead of printed, each distinct one once, and
:func:`write_to` puts them in a file (the trainer: ``<logging.dir>/library_warnings.log``). Every other warning and
log record is shown as before. ``QWENVL_SHOW_LIBRARY_WARNINGS=1`` shows everything.

This module imports only the standard library, so that it can be installed before anything else.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

#: (message pattern, the file that must have raised it or None for any, why it is harmless here). Only messages
#: matching one of these are ever hidden.
KNOWN: tuple[tuple[str, str | None, str], ...] = (
    (r"Transformer Engine and Apex are not installed|Apex is not installed\. Falling back to Torch Norm", None,
     "optional fast paths; megatron falls back to the torch implementations, which are what the tests check"),
    (r"No CUDA runtime is found, using CUDA_HOME", None,
     "torch's extension builder on a machine without a GPU; nothing is compiled"),
    (r"full scope is deprecated", None,
     "megatron's TransformerConfig warns about its own default cuda_graph_scope; no CUDA graphs are configured"),
    (r"MimoModelConfig is experimental", None, "megatron imports its experimental MIMO model; it is not used"),
    (r"torch\.distributed is disabled, unavailable or uninitialized", None,
     "the converters read and write distributed checkpoints in a single process on purpose"),
    (r"MCore's async save is deprecated", None,
     "megatron's torch_dist save strategy logs this for its own (mcore) async writer, which synchronous saves and "
     "checkpoint.async_save use (its successor, nvidia-resiliency-ext, is not installed)"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor|The argument order of load has been changed"
     r"|`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", None,
     "torch deprecations of APIs that megatron-core 0.19 calls internally; nothing to change on our side"),
    (r"DistributedDataParallel: full_param_layout not provided", None,
     "megatron's DDP computes the distributed optimizer's parameter layout itself, as the optimizer would"),
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", r"cpu_compat\.py$",
     "raised from inside the CPU-only device mode (parallel/cpu_compat.py), which forwards megatron's tensor calls "
     "unchanged; that mode never runs on a GPU"),
)

#: Loggers (not their children) that emit known messages through the logging module.
LOGGERS = ("torch.utils.cpp_extension", "megatron.core.dist_checkpointing.strategies.torch",
           "megatron.core.distributed.distributed_data_parallel")

_state: dict = {"installed": False, "seen": [], "file": None, "showwarning": None}


def is_known(message: str, filename: str = "") -> bool:
    """Whether `message` (raised in `filename`, when known) is one of the known harmless library messages."""
    return any(re.search(pattern, message) and (where is None or re.search(where, filename))
               for pattern, where, _ in KNOWN)


def _record(text: str) -> None:
    if text in _state["seen"]:
        return
    _state["seen"].append(text)
    if _state["file"] is not None:
        with open(_state["file"], "a") as f:
            f.write(text + "\n")


def _showwarning(message, category, filename, lineno, file=None, line=None):
    if is_known(str(message), str(filename)):
        _record(f"{category.__name__}: {message} ({filename}:{lineno})")
        return
    _state["showwarning"](message, category, filename, lineno, file, line)


class _KnownFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if is_known(text):
            _record(f"{record.levelname} {record.name}: {text}")
            return False
        return True


def install() -> None:
    """Record the known messages instead of showing them, in this process (idempotent; a no-op when
    QWENVL_SHOW_LIBRARY_WARNINGS=1)."""
    if _state["installed"] or os.environ.get("QWENVL_SHOW_LIBRARY_WARNINGS") == "1":
        return
    _state["installed"] = True
    _state["showwarning"] = warnings.showwarning
    warnings.showwarning = _showwarning
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_KnownFilter())


def recorded() -> list[str]:
    """The distinct known messages recorded so far in this process."""
    return list(_state["seen"])


def write_to(path: str) -> None:
    """Write the messages recorded so far to `path` (replacing it), and append later ones as they come."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("# Known harmless library messages, each once (see qwenvl_mcore/library_noise.py for why)\n")
        f.writelines(text + "\n" for text in _state["seen"])
    _state["file"] = path
