"""The only place where megatron-core is adapted: to run without a GPU (CPU + gloo, for tests and CI), and to
resume its distributed optimizer with torch's Adam (no Apex or transformer-engine, on any machine).

megatron-core 0.19.2 assumes CUDA on a few default code paths. `apply()` installs the smallest fixes, and only
when no GPU is present; on a GPU machine it does nothing. Each fix names the megatron call it covers (see
../shared/notes/megatron-core-on-cpu.md); each of these belongs upstream in megatron-core itself.

1. RNG tracker (tensor_parallel/random.py, `CudaRNGStatesTracker.add/fork`, `model_parallel_cuda_manual_seed`):
   reads and writes CUDA generator states. Replaced by a tracker that keeps CPU generator states.
2. Literal CUDA devices (`device="cuda"`, `device=torch.cuda.current_device()`, `.cuda()`) in the pipeline
   schedules and p2p communication: a TorchFunctionMode maps them to the CPU, and `torch.cuda.current_device`
   answers "cpu". Not active inside autograd's backward of megatron's custom functions, so those must not
   create tensors on an integer device (none on the paths we use does).
3. `Tensor.type()` strings: megatron's DistributedOptimizer and Float16 optimizer sort parameters by
   `param.type() == "torch.cuda.FloatTensor"` (and Half/BFloat16) and refuse anything else; the mode answers
   the CUDA name for a CPU tensor (only the no-argument form, which returns a name).
4. `torch.cuda.synchronize()` after host copies (dist_checkpointing's FileSystemWriterAsync.preload_tensors) and
   batched p2p: there is no device work to wait for, so it becomes a no-op.
5. `torch.cuda.current_stream()` in DDP's `start_grad_sync` (it waits on CUDA-graph events, which never exist
   here): answered by a stream object whose waits do nothing.
6. (any device, `apply_torch_adam_fix()`) Without Apex/transformer-engine the optimizer is torch's Adam, whose
   per-parameter state holds a tensor `step`. `DistributedOptimizer._set_main_param_and_optimizer_states` copies
   every tensor of that state from the loaded checkpoint, whose fully-reshardable parameter state never has
   `step` (megatron restores it from the param groups): KeyError on every resume. The fix marks `step` as absent
   (None), which that method already skips.
7. Activation recompute (`tensor_parallel.checkpoint`, for full and selective recompute) saves and restores the
   CUDA generator state next to the CPU one and the tracker's (`_get_cuda_rng_state`/`_set_cuda_rng_state`):
   there is none, so they do nothing (the CPU states are still saved and restored).
Everything else that would need CUDA is avoided by design rather than patched: the model uses its own SDPA core
attention (no `get_default_causal_mask`), its own rotary embedding, its own norms (sequence-parallel aware), its
own router (no weight move to the GPU in `Router.gating`), and the allgather token dispatcher on the CPU
(`MoEAlltoAllTokenDispatcher` creates a `torch.cuda.Stream`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_DEVICE_MODE: TorchFunctionMode | None = None


def needed() -> bool:
    """True when no usable CUDA device is present."""
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return _APPLIED


class CpuRNGStatesTracker:
    """Drop-in for megatron's CudaRNGStatesTracker that forks the CPU generator instead of the CUDA one."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cuda_type_name(func, args, kwargs):
    if len(args) != 1 or kwargs:
        return func(*args, **kwargs)
    name = func(*args)
    return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)


def _to_on_cpu(func, args, kwargs):
    if len(args) > 1:
        args = (args[0], _to_cpu_device(args[1]), *args[2:])
    return func(*args, **kwargs)


# the methods the mode rewrites beyond a `device=` keyword (a dict lookup: the mode sees every torch call)
_SPECIAL = {
    torch.Tensor.cuda: lambda func, args, kwargs: args[0],
    torch.Tensor.type: _cuda_type_name,
    torch.Tensor.to: _to_on_cpu,
}


class _CudaToCpuMode(TorchFunctionMode):
    """Maps tensor creation on a CUDA device (and `.cuda()`) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            if "device" in kwargs:
                kwargs = dict(kwargs)
                kwargs["device"] = _to_cpu_device(kwargs["device"])
        else:
            kwargs = {}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(func, args, kwargs)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for the current CUDA stream: every wait or synchronisation is already satisfied on the CPU."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def apply() -> bool:
    """Install the fixes when no GPU is present (idempotent). Returns True when they are active."""
    global _APPLIED, _DEVICE_MODE
    if _APPLIED:
        return True
    if not needed():
        return False
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed, which is queued lazily and harmless without
    # a GPU; the tracker's own `add` seeds the CPU generators.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    # 7. Activation recompute (tensor_parallel.checkpoint: recompute_granularity=full and selective core_attn)
    # saves the CUDA generator state with the CPU one and the tracker's (_get_all_rng_states) and restores them
    # for the recomputation: there is no CUDA generator; the CPU states are saved and restored already.
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: None
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: None
    _DEVICE_MODE = _CudaToCpuMode()
    _DEVICE_MODE.__enter__()
    _APPLIED = True
    return True


def device_mode_innermost() -> bool:
    """Whether fix 2's TorchFunctionMode is active and no other mode sits above it (so it can be suspended)."""
    if _DEVICE_MODE is None:
        return False
    from torch.overrides import _get_current_function_mode

    return _get_current_function_mode() is _DEVICE_MODE


@contextlib.contextmanager
def suspended_device_mode():
    """Runs the body without fix 2's TorchFunctionMode (a no-op when it is not active).

    The mode intercepts every torch call (about a quarter more host time per ViT forward + backward); a
    measurement of host overhead meant to stand for the GPU (where the mode is never active) runs inside this.
    The body must not reach megatron code that creates tensors on a CUDA device.
    """
    if _DEVICE_MODE is None:
        yield
        return
    from torch.overrides import _get_current_function_mode

    if _get_current_function_mode() is not _DEVICE_MODE:
        raise RuntimeError("another TorchFunctionMode is active above the CPU-compatibility mode")
    _DEVICE_MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _DEVICE_MODE.__enter__()


_ADAM_FIX_APPLIED = False


def apply_torch_adam_fix() -> None:
    """Fix 6 (idempotent; harmless with Apex/TE, whose Adam keeps no tensor `step`)."""
    global _ADAM_FIX_APPLIED
    if _ADAM_FIX_APPLIED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        return original(self, model_param, {"step": None, **tensors})

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _ADAM_FIX_APPLIED = True
