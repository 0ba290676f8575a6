"""Timing helpers shared by the benchmarks: device-synchronised medians, peak memory, and the environment line
every result table carries."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def start_single_process() -> None:
    """torch.distributed and megatron's parallel state for one process (world size 1, every parallel size 1)."""
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from qwenvl_mcore.testing.dist import free_port

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    init_distributed(ParallelLayout(), seed=1234)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, *, warmup: int = 3, iters: int = 10) -> dict:
    """Run fn() warmup times, then time `iters` calls (each synchronised on the device): seconds as median/min."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "iters": iters}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset_peak (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def environment(device: torch.device) -> dict:
    """Device, driver-visible name and library versions, for the result tables."""
    import transformers

    try:
        import megatron.core as mcore
        mcore_version = mcore.__version__
    except Exception:  # noqa: BLE001 - reported, not needed
        mcore_version = "absent"
    try:
        import transformer_engine  # noqa: F401
        te = transformer_engine.__version__
    except Exception:  # noqa: BLE001
        te = "absent"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "megatron_core": mcore_version, "transformer_engine": te, "python": platform.python_version()}
