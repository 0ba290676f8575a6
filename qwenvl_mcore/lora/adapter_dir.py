"""Reading an HF PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for our model:
`peft.init_from` (start LoRA training from an adapter) and `verify.py --adapter`.

What is checked, each a LoRAConfigError naming the problem and the fix, before any training step:
- the directory is a PEFT LoRA adapter: adapter_config.json with peft_type LORA and adapter_model.safetensors (a
  pickled adapter_model.bin is not read); no LoRA variant or extra we do not have (DoRA, LoRA biases, per-module
  ranks or alphas, modules_to_save, layers_to_transform, fan_in_fan_out);
- it was made for transformers' Qwen3VLMoeForConditionalGeneration: a local base_model_name_or_path whose
  config.json names another model_type, or a tensor name that is no adapter of Qwen3-VL MoE, is refused (a hub name
  alone proves nothing: the tensor names and shapes decide); shapes are checked when the tensors are loaded;
- its rank, alpha, rsLoRA and targets are the run's peft.* settings (each differing key named with both values).
No peft import: JSON and safetensors only.
"""

from __future__ import annotations

import json
import os
import re

from qwenvl_mcore.lora import peft_io
from qwenvl_mcore.lora.config import GROUPS, LoRAConfig, LoRAConfigError

_LM = re.escape(peft_io.LM)
# transformers module name (peft key without prefix and `.lora_X.weight`) -> target kind; experts: see _expert_kinds
_KIND_OF_MODULE = [
    *((pattern, kind) for kind, pattern in peft_io._HF_MODULE_REGEX.items()),
    (_LM + r"\.\d+\.mlp\.gate", "router"),
    (_LM + r"\.\d+\.mlp\.experts(?:\.base_layer)?", "experts"),
]
_KEY = re.compile(re.escape(peft_io.PEFT_PREFIX) + r"(?P<module>.+)\.lora_(?:A|B)\.weight")
# adapter_config.json fields that would change what the adapter computes, and the value we can take
_UNSUPPORTED = {"use_dora": (False, None), "lora_bias": (False, None), "fan_in_fan_out": (False, None),
                "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "modules_to_save": (None, []),
                "layers_to_transform": (None, []), "layers_pattern": (None, [], ""),
                "use_qalora": (False, None)}
MODEL_TYPE = "qwen3_vl_moe"


def _where(path: str) -> str:
    return f"peft.init_from={path}"


def read_adapter(path: str, *, what: str | None = None) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(adapter_config.json, {tensor name: shape}) of a PEFT LoRA adapter directory; LoRAConfigError otherwise.
    `what` names the setting in messages (default peft.init_from=PATH)."""
    what = what or _where(path)
    config_file = os.path.join(path, peft_io.ADAPTER_CONFIG)
    weights = os.path.join(path, peft_io.ADAPTER_WEIGHTS)
    if not os.path.isdir(path):
        raise LoRAConfigError(f"{what}: no such directory; give an HF PEFT adapter directory "
                              f"({peft_io.ADAPTER_CONFIG} + {peft_io.ADAPTER_WEIGHTS}).")
    if not os.path.isfile(config_file):
        hint = ""
        if os.path.isfile(os.path.join(path, "config.json")):
            hint = " It looks like an HF model directory: a full model is a base (model.init_from, after hf2mcore)."
        elif os.path.isfile(os.path.join(path, "qwenvl_mcore.json")) or os.path.isdir(os.path.join(path, "checkpoints")):
            hint = (" It is one of our checkpoints: to continue a LoRA run, resume it (the same checkpoint.dir); to "
                    "start from its adapters, export them first (tools/convert/mcore2hf.py --adapter-only).")
        raise LoRAConfigError(f"{what} is not a PEFT adapter directory (no {peft_io.ADAPTER_CONFIG}).{hint}")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise LoRAConfigError(f"{what}: {config_file} is not readable JSON ({e}).") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise LoRAConfigError(f"{what}: {config_file} describes a {kind!r} adapter, not LoRA (peft_type LORA): "
                              "only LoRA adapters can start a peft=lora run.")
    if not os.path.isfile(weights):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise LoRAConfigError(
            f"{what} has no {peft_io.ADAPTER_WEIGHTS}" + (
                " (only adapter_model.bin, a pickle, which can run code when loaded and is not read: save the adapter "
                "again with safe_serialization=True, peft's default)." if pickled else "."))
    from safetensors import safe_open

    try:
        with safe_open(weights, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged or truncated file: say which
        raise LoRAConfigError(f"{what}: {weights} is not a readable safetensors file ({type(e).__name__}: {e}).") \
            from None
    return config, shapes


def _expert_kinds(config: dict) -> set[str]:
    params = config.get("target_parameters") or []
    kinds = set()
    for name in params:
        if name.endswith("gate_up_proj"):
            kinds.add("experts_gate_up")
        elif name.endswith("down_proj"):
            kinds.add("experts_down")
    return kinds


def adapter_settings(path: str, config: dict, shapes: dict, *, what: str | None = None) -> LoRAConfig:
    """The LoRAConfig an adapter directory describes (method lora, its rank, alpha, rsLoRA, target kinds); refuses
    variants we do not compute and tensors that are no adapter of Qwen3-VL MoE (another architecture)."""
    what = what or _where(path)
    unsupported = [f"{k}={config[k]!r}" for k, ok in _UNSUPPORTED.items() if k in config and config[k] not in ok]
    if unsupported:
        raise LoRAConfigError(f"{what}: the adapter uses {', '.join(unsupported)}, which our LoRA does not compute "
                              "(plain LoRA: one rank and alpha for every target, no bias, no DoRA, no fully trained "
                              "modules): re-train or convert it as a plain LoRA adapter.")
    base = config.get("base_model_name_or_path")
    if base and os.path.isfile(os.path.join(str(base), "config.json")):
        try:
            with open(os.path.join(str(base), "config.json")) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError):
            model_type = None
        if model_type is not None and model_type != MODEL_TYPE:
            raise LoRAConfigError(
                f"{what}: the adapter was made for {base}, a {model_type!r} model, not Qwen3-VL MoE "
                f"({MODEL_TYPE!r}): its tensors cannot fit this model. Use an adapter trained on a Qwen3-VL MoE base.")
    kinds, foreign = set(), []
    for key in shapes:
        m = _KEY.fullmatch(key)
        kind = next((k for pat, k in _KIND_OF_MODULE if m and re.fullmatch(pat, m["module"])), None)
        if kind is None:
            foreign.append(key)
        elif kind == "experts":
            kinds |= _expert_kinds(config) or {"experts"}
        else:
            kinds.add(kind)
    if foreign or "experts" in kinds:
        named = f" (base_model_name_or_path: {base})" if base else ""
        raise LoRAConfigError(
            f"{what}: the adapter was not made for transformers' Qwen3VLMoeForConditionalGeneration{named}: "
            f"{len(foreign)} of its {len(shapes)} tensors name no Qwen3-VL MoE module, e.g. {sorted(foreign)[:3]}"
            + ("; expert tensors without target_parameters" if "experts" in kinds else "")
            + ". Use an adapter trained on a Qwen3-VL MoE base (tools/convert/mcore2hf.py --adapter-only writes one).")
    if not kinds:
        raise LoRAConfigError(f"{what}: {peft_io.ADAPTER_WEIGHTS} holds no LoRA tensor.")
    return LoRAConfig(method="lora", rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                      dropout=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")),
                      targets=sorted(kinds))


def check_matches(run: LoRAConfig, adapter: LoRAConfig, path: str) -> None:
    """The run's peft.rank / alpha / rslora / targets must be the adapter's (each differing key named)."""
    ours = {"rank": run.rank, "alpha": float(run.alpha), "rslora": bool(run.rslora),
            "targets": sorted(run.target_set())}
    theirs = {"rank": adapter.rank, "alpha": float(adapter.alpha), "rslora": adapter.rslora,
              "targets": sorted(adapter.target_set())}
    fields = {"rank": "r", "alpha": "lora_alpha", "rslora": "use_rslora", "targets": "targets"}
    differ = [f"peft.{k}={ours[k]!r} but the adapter has {fields[k]}={theirs[k]!r}" for k in ours
              if ours[k] != theirs[k]]
    if differ:
        fix = " ".join(f"peft.{k}={_override(theirs[k])}" for k in ours if ours[k] != theirs[k])
        raise LoRAConfigError(f"{_where(path)} does not fit the run's adapter settings: {'; '.join(differ)}. Set "
                              f"{fix} (the adapter's), or start from another adapter.")


def _override(value) -> str:
    if isinstance(value, list):  # target kinds, as groups where a whole group is there
        left, names = set(value), []
        for group in ("all", "attention", "experts", "vit", "mergers"):
            if set(GROUPS[group]) <= left:
                names.append(group)
                left -= set(GROUPS[group])
        return "[" + ",".join(names + sorted(left)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_init_adapter(run: LoRAConfig) -> None:
    """peft.init_from: a LoRA adapter for Qwen3-VL MoE with the run's settings (cheap: JSON and the safetensors
    header; rank 0 before anything is built). Shapes are checked by load_init_adapter."""
    config, shapes = read_adapter(run.init_from)
    check_matches(run, adapter_settings(run.init_from, config, shapes), run.init_from)


def load_adapter_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, peft_io.ADAPTER_WEIGHTS))


def load_init_adapter(chunks, args, path: str, *, what: str | None = None) -> None:
    """Copy the adapter directory `path` (peft.init_from) into this rank's adapters (after apply_lora). Collective:
    a tensor that is missing or of another shape on any rank (an adapter of another size of model) stops every rank
    with the same LoRAConfigError."""
    import torch.distributed as dist

    what = what or _where(path)
    error = None
    try:
        peft_io.load_peft_tensors(chunks, args, load_adapter_tensors(path))
    except (KeyError, ValueError) as e:
        error = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if dist.is_available() and dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise LoRAConfigError(f"{what}: the adapter's tensors do not fit this model (an adapter for another "
                              f"architecture or size of model than model.init_from?): {error}")


__all__ = ["MODEL_TYPE", "adapter_settings", "check_init_adapter", "check_matches", "load_adapter_tensors",
           "load_init_adapter", "read_adapter"]
