"""Host overhead of one whole training step, ours against transformers, measured on the CPU at tiny widths where
the arithmetic is negligible: aten calls, host syncs and host time per step.

    python tools/bench/host_overhead.py [--flavor debug] [--layers 4] [--vit-depth N] [--seq-length 256]
        [--samples-per-row 2] [--image-side 8] [--microbatches 2] [--iters 3] [--top 12] [--json out.json]
    python tools/bench/host_overhead.py --parts [--vit-depth 27] [--layers 4]   # also the ViT / decoder parts

One training step of the same packed batch (forward and backward of every micro-batch, then the optimizer step):
- ours: the trainer's own step (`training.step.train_step`: megatron DDP, distributed optimizer with fp32 main
  weights, per-token loss, aux loss), set up as tools/bench/train_step.py does, grouped-GEMM experts (the GPU path);
- transformers: `Qwen3VLMoeForConditionalGeneration` (sdpa, grouped_mm experts), gradient clipping and torch's
  AdamW, as train_step.py does.
Counted per step (one step under the counting modes, after a warm-up step):
- aten calls: every aten op that reaches a TorchDispatchMode (about one kernel launch each on a GPU; forward,
  backward and optimizer);
- host syncs: what would block the host on a GPU (`SyncCounter` below has the list and the residency rule);
- host ms: the median wall time of `--iters` steps without the counting modes, ours and transformers' taking
  turns (drift in the machine's speed hits both alike). On the CPU this is the whole step
  (host work and arithmetic together; the widths are tiny so the arithmetic is small), with one intra-op thread.
  cpu_compat's device mode (CPU only: it intercepts every torch call, about 1.5 us each, and never runs on a
  GPU) is left out wherever the code allows: all of transformers' step, and our model's forward and optimizer
  step; megatron's schedule code and finalize_model_grads keep it (autograd's backward, hooks included, never runs
  under a TorchFunctionMode). The table (and `--json`) also gives the process CPU time
  of the step, steadier when other jobs share the cores.
Calls and syncs are also split by phase: "optimizer" (ours: training/optimizer_step.py's prepare and step, or
megatron's prepare_grads, get_grad_norm and step where it falls back;
transformers: clip_grad_norm_ and AdamW.step) and "forward+backward" (the rest, DDP's gradient hooks and finalize
included). At EP=1 ours uses the project's own token dispatcher (models/qwen3_vl_moe/dispatch.py), the GPU's
path too. Printed: the phases, the syncs by op and by call site, the top aten ops,
the table; the last line is the JSON object {"ours": {"aten_calls", "host_syncs", "host_ms"},
"transformers": {...}} (`--json` writes all the details).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import start_single_process  # noqa: E402
from train_step import build_hf_model, reduced_config, synthetic_rows  # noqa: E402

from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionContext, RotaryTables  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX, packed_attention_segments  # noqa: E402
from qwenvl_mcore.parallel import ParallelLayout, cpu_compat  # noqa: E402
from qwenvl_mcore.parallel.distributed import destroy_distributed  # noqa: E402
from qwenvl_mcore.testing.parity import build_pair  # noqa: E402
from qwenvl_mcore.training.schedule import unwrap  # noqa: E402

_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_aten = torch.ops.aten

# aten ops whose output size depends on the data: on a GPU the host reads that size back (a sync)
DATA_DEPENDENT_OPS = {
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique.default: "unique",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.bincount.default: "bincount",
    _aten.equal.default: "equal",
    _aten.is_nonzero.default: "is_nonzero",
    _aten._local_scalar_dense.default: "_local_scalar_dense",
}
# Python-level reads of a tensor's values on the host (`__bool__`, `int()`, `float()`, ... all go through these)
HOST_READS = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy",
    torch.Tensor.cpu: "cpu", torch.Tensor.__bool__: "bool", torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float", torch.Tensor.__index__: "index",
}
# factories patched while counting, to see their `device=` argument (torch function modes do not see them)
_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
              "linspace")


_DEVICE_DESCRIPTOR = torch.Tensor.device  # its getter reaches torch function modes


class _DeviceMarker(str):
    """What `torch.cuda.current_device()` answers while counting: the CPU-compatibility mode's "cpu", recognisable
    as a request for the GPU."""


class SyncCounter:
    """Counts, for the body of a `with`, the aten calls and the host syncs a GPU would see.

    On the CPU every tensor is on the host, so residency is tracked as it would be on a GPU. Host-resident are:
    the tensors passed as `host` (say a batch's token ids the trainer keeps on the host); tensors made by a factory
    (`torch.tensor`, `zeros`, `arange`, ...) without `device=`, with `device="cpu"`, `device=t.device` for a
    host-resident t, or another CPU `torch.device`; Python constants lifted to tensors (`t[mask] = 5`); results of
    `.cpu()`, `.to("cpu")` or `.to(t.device)` for a host-resident t; and results of ops whose tensor inputs are all
    host-resident. Everything else is device-resident: tensors that existed before the `with` (parameters,
    gradient buffers, optimizer states, a batch already on the device), factory results with `device=` a CUDA
    device, `torch.cuda.current_device()` (which answers a marked "cpu" while counting) or a device-resident t's
    `.device`, `.cuda()` results, and results of ops with any device-resident input. (`t.device` objects are
    remembered by identity to tell these apart; `.to()` a CPU `torch.device` of other origin, such as
    `torch.device("cpu")` or one torch made in C++, changes nothing and counts nothing.)

    A host sync is one of these on a device-resident tensor:
    - a read of its values on the host: `.item()`, `.tolist()`, `.numpy()`, `.cpu()`, `.to("cpu")`, `bool()`,
      `int()`, `float()`, `operator.index()` (so `if t:`, `range(t)`), and `torch.tensor([...])`/`as_tensor` of a list
      holding device tensors (one sync per such element);
    - an aten op whose output size or value the host must read: `nonzero` (also `torch.where(c)`, `argwhere`),
      `masked_select`, `unique` (all forms), `bincount`, `equal`, `is_nonzero`, `repeat_interleave` of a tensor of
      repeats without `output_size`, indexing (`index`, `index_put_`) with a boolean mask, and
      `_local_scalar_dense` reached other than through the reads above;
    - `copy_` into a host-resident tensor from a device-resident one (a device-to-host copy).
    Not counted: collectives (NCCL is asynchronous), CUDA-stream or event waits (none exist on the CPU), and
    anything the CPU-compatibility mode rewrites before it reaches the modes.
    """

    def __init__(self, host=()):
        self.host = WeakIdKeyDictionary()
        for t in host:
            self.host[t] = True
        self.aten_calls = 0
        self.ops = collections.Counter()
        self.syncs = collections.Counter()
        self.sites = collections.Counter()
        self._reading = 0
        self._device_objects = {}  # id(torch.device from some t.device) -> (that object, t host-resident)
        self.phase = "forward+backward"
        self.calls_by_phase = collections.Counter()
        self.syncs_by_phase = collections.Counter()

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values())

    def is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.host

    def on_host(self, device) -> bool | None:
        """Where a `device=`/`.to()` target puts a tensor: True (host), False (device), None (unknown)."""
        if device is None:
            return None
        if isinstance(device, torch.Tensor):
            return self.is_host(device)
        if isinstance(device, torch.device):
            known = self._device_objects.get(id(device))
            if known is not None and known[0] is device:
                return known[1]  # some tensor's `.device`: where that tensor lives
            # made elsewhere (a literal torch.device, or by torch in C++, as clip_grad_norm_'s grouping does): a CPU
            # one is where some tensor lives, unknown here
            return None if device.type == "cpu" else False
        if isinstance(device, _DeviceMarker):
            return False  # torch.cuda.current_device()
        if isinstance(device, str):
            return device == "cpu"
        return False  # a CUDA ordinal

    def _mark(self, tensors, host: bool) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                if host:
                    self.host[t] = True
                else:
                    self.host.pop(t, None)

    def _sync(self, name: str, n: int = 1) -> None:
        self.syncs[name] += n
        self.syncs_by_phase[self.phase] += n
        self.sites[f"{name} @ {_call_site(sys._getframe(1))}"] += n

    def __enter__(self):
        global _ACTIVE
        _ACTIVE = self
        self._saved = {name: getattr(torch, name) for name in _FACTORIES}
        for name, original in self._saved.items():
            setattr(torch, name, self._factory(original))
        self._current_device = torch.cuda.current_device
        if cpu_compat.is_applied():
            torch.cuda.current_device = lambda: _DeviceMarker("cpu")
        self._function_mode = _ReadMode(self)
        self._dispatch_mode = _CountMode(self)
        self._dispatch_mode.__enter__()
        self._function_mode.__enter__()
        return self

    def __exit__(self, *exc):
        global _ACTIVE
        _ACTIVE = None
        self._function_mode.__exit__(*exc)
        self._dispatch_mode.__exit__(*exc)
        torch.cuda.current_device = self._current_device
        for name, original in self._saved.items():
            setattr(torch, name, original)
        return False

    def call_reading(self, func, args, kwargs):
        """func(*args, **kwargs) with a host read under way: its inner aten copies are that read, not new syncs."""
        self._reading += 1
        try:
            return func(*args, **kwargs)
        finally:
            self._reading -= 1

    def _factory(self, original):
        counter = self

        def factory(*args, **kwargs):
            if original in (self._saved["tensor"], self._saved["as_tensor"]) and args:
                leaves = [x for x in tree_flatten(args[0])[0] if isinstance(x, torch.Tensor)] \
                    if isinstance(args[0], (list, tuple)) else []
                device_leaves = [x for x in leaves if not counter.is_host(x)]
                if device_leaves:
                    counter._sync("torch.tensor(list of tensors)", len(device_leaves))
                out = counter.call_reading(original, args, kwargs)
            else:
                out = original(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                counter._mark([out], host=counter.on_host(kwargs.get("device")) is not False)
            return out

        return factory


_ACTIVE: SyncCounter | None = None


def without_device_mode(fn):
    """fn run without cpu_compat's device mode (CPU-only: it intercepts every torch call and never runs on a GPU)
    where that mode is the innermost one; under the counting modes fn runs as it is (the counts do not depend on it).
    Only for code that creates no tensor on a CUDA device."""
    def wrapped(*args, **kwargs):
        if not cpu_compat.device_mode_innermost():
            return fn(*args, **kwargs)
        with cpu_compat.suspended_device_mode():
            return fn(*args, **kwargs)

    return wrapped


def in_phase(name: str, fn):
    """fn wrapped so that what it issues is attributed to phase `name` of the active counter (outermost wins)."""
    def wrapped(*args, **kwargs):
        counter = _ACTIVE
        if counter is None or counter.phase == name:
            return fn(*args, **kwargs)
        outer, counter.phase = counter.phase, name
        try:
            return fn(*args, **kwargs)
        finally:
            counter.phase = outer

    return wrapped


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "/torch/"):
        if marker in path:
            return ("torch/" if marker == "/torch/" else "") + path.split(marker, 1)[1]
    return path


_COUNTER_FUNCTIONS = {"_sync", "__torch_function__", "__torch_dispatch__", "factory"}
_SKIPPED_FILES = {os.path.abspath(cpu_compat.__file__), os.path.join(_TORCH_DIR, "overrides.py"),
                  os.path.join(_TORCH_DIR, "utils", "_python_dispatch.py"), os.path.join(_TORCH_DIR, "_compile.py")}
_SKIPPED_DIRS = (os.path.join(_TORCH_DIR, "_dynamo") + os.sep,)


def _call_site(frame) -> str:
    """Where a sync was issued: the innermost frame outside the counter (and the CPU-compatibility mode); when that
    is inside torch, also the first caller outside torch."""
    def skipped(f):
        path = f.f_code.co_filename
        return (path == _HERE and f.f_code.co_name in _COUNTER_FUNCTIONS) or path in _SKIPPED_FILES \
            or path.startswith(_SKIPPED_DIRS) or path.startswith("<")

    def where(f):
        return f"{_short(f.f_code.co_filename)}:{f.f_lineno} ({f.f_code.co_name})"

    while frame is not None and skipped(frame):
        frame = frame.f_back
    if frame is None:
        return "?"
    if not frame.f_code.co_filename.startswith(_TORCH_DIR):
        return where(frame)
    outer = frame.f_back
    while outer is not None and (outer.f_code.co_filename.startswith(_TORCH_DIR) or skipped(outer)):
        outer = outer.f_back
    return where(frame) + ("" if outer is None else f" <- {where(outer)}")


def _target_device(func, args, kwargs):
    """The device a `.to(...)`/`.cuda()` call moves to (a tensor: that tensor's), or None."""
    if func is torch.Tensor.cuda:
        return "cuda"
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (str, torch.device, int, torch.Tensor)) and not isinstance(a, bool):
            return a
    return None


class _ReadMode(TorchFunctionMode):
    """Host reads at the Python API, and moves between host and device."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        if getattr(func, "__self__", None) is _DEVICE_DESCRIPTOR:  # t.device: remember where t lives
            out = func(*args, **kwargs)
            c._device_objects[id(out)] = (out, c.is_host(args[0]))
            return out
        if func in HOST_READS and args and isinstance(args[0], torch.Tensor):
            src = args[0]
            out = c.call_reading(func, args, kwargs)
            if not c.is_host(src):
                c._sync(HOST_READS[func])
                if func is torch.Tensor.cpu:
                    out = out.clone() if out is src else out
                    c._mark([out], host=True)
            return out
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args and isinstance(args[0], torch.Tensor):
            src = args[0]
            target = _target_device(func, args, kwargs)
            out = c.call_reading(func, args, kwargs)
            if target is None or not isinstance(out, torch.Tensor):
                return out
            to_host = c.on_host(target)
            if to_host and not c.is_host(src):
                c._sync("to(cpu)")
                out = out.clone() if out is src else out
                c._mark([out], host=True)
            elif to_host is False and c.is_host(src):
                out = out.clone() if out is src else out  # the host copy stays host-resident
                c._mark([out], host=False)
            return out
        return func(*args, **kwargs)


class _CountMode(TorchDispatchMode):
    """Aten calls, data-dependent ops and device-to-host copies; propagates residency."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        if func.namespace == "aten":
            c.aten_calls += 1
            c.ops[func.__name__] += 1
            c.calls_by_phase[c.phase] += 1
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        all_host = all(c.is_host(t) for t in inputs)
        if not all_host:
            name = DATA_DEPENDENT_OPS.get(func)
            if name == "_local_scalar_dense" and c._reading:
                name = None  # counted as the read that issued it
            if name is None and func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                name = "repeat_interleave"
            if name is None and func in (_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
                                         _aten._index_put_impl_.default):
                if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                    name = "boolean-mask indexing"
            if name is None and func is _aten.copy_.default and c.is_host(args[0]) and not c.is_host(args[1]):
                name = "copy_ device to host"
            if name is not None:
                c._sync(name)
        out = func(*args, **kwargs)
        if func in (_aten.lift_fresh.default, _aten.lift_fresh_copy.default):
            all_host = True  # a constant from Python (`t[mask] = 5`, `torch.tensor(...)`): made on the host
        if func is _aten.copy_.default:
            return out  # the destination keeps its residency
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        c._mark(outputs, host=all_host)
        return out


def aten_calls(fn) -> int:
    """Top-level aten calls of one fn() (those not issued by another aten op), by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def measure(fn, iters: int) -> dict:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    ms = (time.perf_counter() - start) / iters * 1e3
    calls = aten_calls(fn)
    return {"ms": ms, "aten_calls": calls, "us_per_call": ms * 1e3 / calls}


def parts(a) -> None:
    """Forward + backward of the ViT and of the decoder layers alone (the debug model's widths, the real depths)."""
    vit_depth = a.vit_depth or 27
    cfg = copy.deepcopy(flavor_hf_config("debug"))
    cfg["vision_config"]["depth"] = vit_depth
    cfg["text_config"]["num_hidden_layers"] = a.layers
    taps = [i for i in (8, 16, 24) if i < vit_depth][: a.layers]
    cfg["vision_config"]["deepstack_visual_indexes"] = taps
    args = args_from_hf_config(cfg)
    hf = build_hf_model(cfg, torch.device("cpu"), torch.float32, "grouped_mm")
    model = unwrap(build_pair(hf, ParallelLayout())[0][0])
    model.train()
    hf.train()
    for layer in model.decoder.layers:
        layer.mlp.experts.grouped_gemm = True  # the GPU path's call sequence

    v = args.vision
    grid = torch.tensor([[1, 8, 8]] * a.images)
    pixels = torch.randn(64 * a.images, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)

    def backward(outputs):
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    def ours_vit():
        merged, deep = model.vision(pixels, grid)
        backward([merged, *deep])

    def hf_vit():
        out = hf.model.visual(pixels, grid_thw=grid)
        backward([out.pooler_output, *out.deepstack_features])

    s, h = a.tokens, args.text.hidden_size
    hidden = torch.randn(s, 1, h, requires_grad=True)
    positions = torch.arange(s).view(1, 1, s).expand(3, 1, s)
    context = AttentionContext(packed_attention_segments(torch.tensor([0, s // 2, s]), s),
                               RotaryTables(model.rotary(positions), torch.float32))
    language = hf.model.language_model
    hf_hidden = torch.randn(1, s, h, requires_grad=True)
    hf_positions = torch.cat([torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)]).view(1, 1, s), positions])
    rotary = language.rotary_emb(hf_hidden, hf_positions[1:])

    def ours_decoder():
        backward([model.decoder(hidden, attention_mask=context, rotary_pos_emb=None)])

    def hf_decoder():
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=language.config, inputs_embeds=hf_hidden, attention_mask=None,
                                  past_key_values=None, position_ids=hf_positions[0])
        y = hf_hidden
        for layer in language.layers:
            y = layer(y, attention_mask=mask, position_ids=hf_positions[0], position_embeddings=rotary)
        backward([language.norm(y)])

    rows = []
    # Without a GPU, cpu_compat's device mode intercepts every torch call (about a quarter more time); it is
    # never active on the GPU, so the measurement runs without it (these modules create no CUDA tensors).
    with cpu_compat.suspended_device_mode():
        for part, ours, theirs in (("vision tower", ours_vit, hf_vit), ("decoder layers", ours_decoder, hf_decoder)):
            for name, fn in (("qwenvl-mcore", ours), ("transformers", theirs)):
                rows.append({"part": part, "impl": name, **measure(fn, a.iters)})
    print(f"# host cost per forward + backward on the CPU (1 thread, tiny widths): ViT {vit_depth} blocks, "
          f"{a.images} x 64 patches; {a.layers} MoE layers, {s} packed tokens")
    print("| part | impl | aten calls | ms | us per call |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['impl']} | {r['aten_calls']} | {r['ms']:.1f} | {r['us_per_call']:.1f} |")


def count(fn, host=()) -> SyncCounter:
    """fn() once under a SyncCounter whose host-resident tensors are `host`."""
    with SyncCounter(host) as counter:
        fn()
    return counter


def timed_ms(fns: dict, iters: int) -> dict[str, tuple[float, float]]:
    """Median wall and process CPU milliseconds of each fn() over `iters` rounds; each round calls every fn once,
    in turn, so that drift in the machine's speed (other jobs, a shared VM) hits them alike. The CPU time is
    steadier than the wall time when other jobs share the cores."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def step_config(a) -> dict:
    cfg = reduced_config(a.flavor, a.layers or None)
    if a.vit_depth:
        cfg["vision_config"]["depth"] = a.vit_depth
        taps = cfg["vision_config"].get("deepstack_visual_indexes") or []
        cfg["vision_config"]["deepstack_visual_indexes"] = [i for i in taps if i < a.vit_depth]
    return cfg


def whole_step(a) -> dict:
    """One training step of ours and of transformers on the same weights and batch: aten calls, syncs, host ms."""
    from qwenvl_mcore.training.setup import OptimSettings, build_optimizer, wrap_ddp
    from qwenvl_mcore.training.step import train_step

    cfg = step_config(a)
    args = args_from_hf_config(cfg)
    rows = synthetic_rows(args, rows=a.microbatches, seq_length=a.seq_length, samples=a.samples_per_row,
                          side=a.image_side, seed=0)
    hf = build_hf_model(cfg, torch.device("cpu"), torch.float32, "grouped_mm")
    chunks, _ = build_pair(hf, ParallelLayout())
    for layer in unwrap(chunks[0]).decoder.layers:
        layer.mlp.experts.grouped_gemm = True  # the GPU path's call sequence
    chunks = wrap_ddp(chunks, distributed_optimizer=True)
    optimizer, _ = build_optimizer(chunks, OptimSettings(lr=1e-5, clip_grad=1.0), steps=a.iters + 3)
    # the GPU's Adam: setup.use_fused_torch_adam makes it torch's fused Adam for CUDA parameters only (on the CPU
    # torch's default single-tensor Adam reads every `step` with .item()); fused Adam also runs on the CPU
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            group["foreach"], group["fused"] = False, True
    for c in chunks:
        c.train()
    # train_step's optimizer phase: optimizer_step.prepare (gradients and their norm) and optimizer_step.step (the
    # lean step), or megatron's own methods on the instance where it falls back (fallback_reason)
    from qwenvl_mcore.training import optimizer_step

    for method in ("prepare", "step"):
        setattr(optimizer_step, method, in_phase("optimizer", without_device_mode(getattr(optimizer_step, method))))
    # the model's forward (ours, as transformers' whole step below) creates no CUDA tensor: it runs without the
    # CPU-only device mode, which megatron's schedule around it needs (`device="cuda"` literals)
    model = unwrap(chunks[0])
    model.forward = without_device_mode(model.forward)
    for method in ("prepare_grads", "get_grad_norm", "step"):
        setattr(optimizer, method, in_phase("optimizer", getattr(optimizer, method)))
    micro = [ours for ours, _ in rows]
    # what the trainer keeps on the host (train_step.py moves only the pixels to the device; the model computes
    # the packed MRoPE positions and the visual-token rows from the host copy of the token ids)
    ours_host = [t for m in micro for t in (m.input_ids, m.labels, m.cu_seqlens, m.image_grid_thw)
                 if isinstance(t, torch.Tensor)]

    def ours_step():
        train_step(chunks, optimizer, micro)

    hf.train()
    batches = [hf_batch for _, hf_batch in rows]  # all of it on the device, as train_step.py does
    tokens = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
    hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    @without_device_mode
    def hf_step():
        hf_optimizer.zero_grad(set_to_none=True)
        for b, n in zip(batches, tokens):
            out = hf(**b, use_cache=False, output_router_logits=True)
            (out.loss * (n / sum(tokens))).backward()
        in_phase("optimizer", hf_optimizer_step)()

    def hf_optimizer_step():
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_optimizer.step()

    result = {}
    steps = {"ours": ours_step, "transformers": hf_step}
    for fn in steps.values():
        fn()  # warm-up: lazy state (optimizer states, caches) out of the way
    times = timed_ms(steps, a.iters)
    for name, fn, host in (("ours", ours_step, ours_host), ("transformers", hf_step, ())):
        ms, cpu_ms = times[name]
        counter = count(fn, host)
        result[name] = {"aten_calls": counter.aten_calls, "host_syncs": counter.host_syncs, "host_ms": round(ms, 1),
                        "cpu_ms": round(cpu_ms, 1),
                        "syncs_by_op": dict(counter.syncs.most_common()),
                        "aten_calls_by_phase": dict(counter.calls_by_phase),
                        "host_syncs_by_phase": dict(counter.syncs_by_phase),
                        "sync_sites": dict(counter.sites.most_common(a.top)),
                        "top_ops": dict(counter.ops.most_common(a.top))}
    result["config"] = {"flavor": a.flavor, "llm_layers": args.text.num_hidden_layers,
                        "vit_depth": args.vision.depth, "microbatches": a.microbatches,
                        "seq_length": a.seq_length, "samples_per_row": a.samples_per_row,
                        "image_side": a.image_side, "iters": a.iters, "threads": torch.get_num_threads()}
    return result


def print_step(result: dict, top: int) -> None:
    cfg = result["config"]
    print(f"# one training step (forward + backward of {cfg['microbatches']} micro-batches, optimizer step) on the "
          f"CPU, fp32, {cfg['threads']} thread: {cfg['flavor']} widths, {cfg['llm_layers']} LLM layers, "
          f"{cfg['vit_depth']} ViT blocks, rows of {cfg['seq_length']} tokens ({cfg['samples_per_row']} samples, "
          f"{cfg['image_side']}x{cfg['image_side']}-patch images); host ms = whole step wall time on the CPU "
          f"(host work and arithmetic), process CPU ms = the CPU time it used, medians of {cfg['iters']} steps")
    for name in ("ours", "transformers"):
        r = result[name]
        print(f"## {name}: by phase (optimizer: gradient norm, clip, update): aten calls "
              + ", ".join(f"{k} {v}" for k, v in r["aten_calls_by_phase"].items()) + "; host syncs "
              + (", ".join(f"{k} {v}" for k, v in r["host_syncs_by_phase"].items()) or "none"))
        print(f"## {name}: host syncs by op: " + ", ".join(f"{k} {v}" for k, v in r["syncs_by_op"].items()))
        for site, n in r["sync_sites"].items():
            print(f"   {n:5d}  {site}")
        print(f"## {name}: top aten ops: " + ", ".join(f"{k} {v}" for k, v in r["top_ops"].items()))
    print("| step | aten calls | host syncs | host ms (CPU wall) | process CPU ms |")
    print("|---|---|---|---|---|")
    for name, label in (("ours", "qwenvl-mcore"), ("transformers", "transformers")):
        r = result[name]
        print(f"| {label} | {r['aten_calls']} | {r['host_syncs']} | {r['host_ms']:.1f} | {r['cpu_ms']:.1f} |")
    print(json.dumps({name: {k: result[name][k] for k in ("aten_calls", "host_syncs", "host_ms")}
                      for name in ("ours", "transformers")}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug", help="model widths (default: the tiny debug model)")
    p.add_argument("--layers", type=int, default=4, help="LLM layers (0: the flavor's own)")
    p.add_argument("--vit-depth", type=int, default=None,
                   help="ViT blocks (default: the flavor's own in the step, 27 in --parts)")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per packed row (micro-batch)")
    p.add_argument("--samples-per-row", type=int, default=2)
    p.add_argument("--image-side", type=int, default=8, help="patches per image side (one image per sample)")
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="timed steps (median) / timed part runs")
    p.add_argument("--top", type=int, default=12, help="call sites of host syncs listed per side")
    p.add_argument("--parts", action="store_true", help="also the ViT and decoder parts alone (printed first)")
    p.add_argument("--tokens", type=int, default=256, help="--parts: tokens of the packed row (two samples)")
    p.add_argument("--images", type=int, default=4, help="--parts: 8x8-patch images in the ViT batch")
    p.add_argument("--json", help="write the step's results (with the syncs by op and call site) here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    start_single_process()
    try:
        if a.parts:
            parts(a)
        result = whole_step(a)
    finally:
        destroy_distributed()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    print_step(result, a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
