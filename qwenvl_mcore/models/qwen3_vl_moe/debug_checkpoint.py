"""A randomly initialised tiny Qwen3-VL MoE checkpoint on disk (the `debug` flavor's weights), made locally.

`save_tiny_hf_checkpoint` writes an HF directory (config, sharded safetensors, tokenizer and processor files) in either
expert layout: the released one or the one transformers 5 writes. The demo (qwenvl_mcore.demo) and the tests use it;
qwenvl_mcore.testing.tiny re-exports it with the tests' other fixtures.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from qwenvl_mcore.models.qwen3_vl_moe.config import released_config_dict
from qwenvl_mcore.models.qwen3_vl_moe.debug_assets import build_processor, build_tokenizer, tiny_hf_config

#: ``"released"``: experts on disk as in the released shards, gate_up_proj [E, hidden, 2*moe_inter] and down_proj
#: [E, moe_inter, hidden]. ``"transformers5"``: what ``save_pretrained`` of transformers 5 writes (its in-memory
#: layout), gate_up_proj [E, 2*moe_inter, hidden] and down_proj [E, hidden, moe_inter].
EXPERT_LAYOUTS = ("released", "transformers5")

_EXPERT_SUFFIXES = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def _is_norm_weight(name: str, module_types: dict[str, str]) -> bool:
    module_name = name.rsplit(".", 1)[0]
    return name.endswith(".weight") and ("Norm" in module_types.get(module_name, ""))


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter of ``model`` with seeded random values (in place) and return it.

    Contract: deterministic for a given ``seed`` and config (parameters are drawn in name order from one CPU
    generator in fp32, then cast); norm weights 1 + 0.1 * N(0, 1) (RMSNorm and LayerNorm alike), biases
    0.1 * N(0, 1), embedding tables N(0, 1), every other weight N(0, 1 / fan_in) with fan_in the input width
    (last dim of the in-memory expert tensors, prod(shape[1:]) otherwise), so activations and logits stay O(1).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    module_types = {name: type(mod).__name__ for name, mod in model.named_modules()}
    params = dict(model.named_parameters())  # tied parameters appear once
    for name in sorted(params):
        p = params[name]
        shape = tuple(p.shape)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        module_type = module_types.get(name.rsplit(".", 1)[0], "")
        if _is_norm_weight(name, module_types):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.1 * noise
        elif "Embedding" in module_type:
            value = noise
        else:
            if len(shape) == 3 and name.endswith(_EXPERT_SUFFIXES):
                fan_in = shape[-1]
            else:
                fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            value = noise / math.sqrt(fan_in)
        p.copy_(value.to(p.dtype))
    return model


def build_tiny_hf_model(config=None, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """Return ``Qwen3VLMoeForConditionalGeneration(config)`` with :func:`randomize_weights` (eval mode, on CPU).

    ``config`` defaults to ``tiny_hf_config(**config_overrides)``. Deterministic: the same ``seed`` and config give
    bit-identical parameters (drawn in fp32, then cast to ``dtype``).
    """
    from transformers import Qwen3VLMoeForConditionalGeneration

    if config is None:
        config = tiny_hf_config(**config_overrides)
    elif config_overrides:
        raise ValueError("pass either `config` or config overrides, not both")
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # only for the constructor's own init, which randomize_weights overwrites anyway
        model = Qwen3VLMoeForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(torch_state)
    randomize_weights(model, seed=seed)
    model = model.to(dtype)
    model.eval()
    return model


def to_released_expert_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a copy of a transformers-5 state dict with the fused expert tensors in the released layout.

    gate_up_proj [E, 2I, H] -> [E, H, 2I] and down_proj [E, H, I] -> [E, I, H] (transpose of dims 1 and 2, made
    contiguous); every other tensor is passed through unchanged.
    """
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith(_EXPERT_SUFFIXES):
            if tensor.ndim != 3:
                raise ValueError(f"{name}: expected a 3-D fused expert tensor, got shape {tuple(tensor.shape)}")
            tensor = tensor.transpose(1, 2)
        out[name] = tensor.contiguous()
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(i?)B?\s*", size.upper().replace("IB", "I"))
    if not m:
        raise ValueError(f"cannot parse size {size!r}")
    number, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if binary else 1000
    return int(number * {"": 1, "K": base, "M": base**2, "G": base**3}[unit])


def _write_sharded_safetensors(
    state_dict: Mapping[str, torch.Tensor], out_dir: Path, max_shard_size: int | str
) -> dict[str, str]:
    """Write ``state_dict`` as ``model-0000i-of-0000n.safetensors`` shards + ``model.safetensors.index.json``.

    Tensors are placed in name order; a shard is closed when the next tensor would push it past ``max_shard_size``
    (a tensor larger than the limit gets a shard of its own). One file means ``model.safetensors`` and no index.
    """
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    current = 0
    for name in sorted(state_dict):
        nbytes = state_dict[name].numel() * state_dict[name].element_size()
        if shards[-1] and current + nbytes > limit:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {k: state_dict[k].detach().cpu().contiguous() for k in names}
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        for k in names:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def save_tiny_hf_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    expert_layout: str = "released",
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "200KB",
    config=None,
    tokenizer=None,
    **config_overrides,
) -> Path:
    """Write a randomly initialised tiny Qwen3-VL MoE checkpoint directory and return its path.

    Contract: ``out_dir`` holds ``config.json``, sharded safetensors (``model-*-of-*.safetensors``) with
    ``model.safetensors.index.json``, the tokenizer files, ``preprocessor_config.json`` /
    ``video_preprocessor_config.json`` / processor config and ``chat_template.jinja``. Weights are those of
    ``build_tiny_hf_model(config, seed=seed, dtype=dtype)``; ``config`` defaults to
    ``tiny_hf_config(tokenizer, **config_overrides)`` and ``tokenizer`` to :func:`build_tokenizer`.

    ``expert_layout="released"`` writes the fused expert tensors as the released Qwen3-VL MoE files hold them
    (gate_up_proj [E, hidden, 2*moe_inter], down_proj [E, moe_inter, hidden], see ``checkpoint_layout.md``) and a
    ``config.json`` in the released (transformers 4.57) spelling; ``"transformers5"`` uses ``save_pretrained`` of
    transformers 5 as is (gate_up_proj [E, 2*moe_inter, hidden], down_proj [E, hidden, moe_inter], its own config
    spelling). Either directory loads with ``Qwen3VLMoeForConditionalGeneration.from_pretrained`` into
    bit-identical parameters (transformers 5 transposes released-layout experts on load, see below).
    """
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    if config is None:
        config = tiny_hf_config(tokenizer, **config_overrides)
    elif config_overrides:
        raise ValueError("pass either `config` or config overrides, not both")
    model = build_tiny_hf_model(config, seed=seed, dtype=dtype)

    # How transformers 5.23 treats the two layouts: `conversion_mapping.py` registers for model type "qwen3_vl_moe"
    # two `WeightConverter`s (mlp.experts.gate_up_proj / down_proj) with `Transpose(1, 2, check_dims=True)`
    # (`core_model_loading.py`). On load the file tensor is transposed only when its shape differs from the in-memory
    # parameter, so released files are converted and transformers-5 files pass through. On save the reverse op is the
    # same check-dims transpose, which finds the shapes equal and does nothing: `save_pretrained` therefore writes the
    # in-memory (transposed) layout. The released layout has to be written by hand, as below. The check is purely by
    # shape: it cannot tell the layouts apart when hidden == 2 * moe_inter (gate_up) or hidden == moe_inter (down),
    # which the tiny config avoids.
    if expert_layout == "transformers5":
        model.save_pretrained(out, max_shard_size=max_shard_size)
    else:
        config_dict = released_config_dict(model.config)
        config_dict["text_config"]["dtype"] = str(dtype).removeprefix("torch.")  # as the released files record it
        (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        state = dict(model.state_dict())
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        _write_sharded_safetensors(to_released_expert_layout(state), out, max_shard_size)

    _save_processor(build_processor(tokenizer), out)
    return out


def _save_processor(processor, out: Path) -> None:
    """Save the processor as transformers 5 does, plus the per-component files the released repos carry."""
    processor.save_pretrained(out)
    # Released repos hold `preprocessor_config.json` and `video_preprocessor_config.json`; transformers 5 puts both
    # into `processor_config.json` but still reads the separate files, as do older readers.
    processor.image_processor.save_pretrained(out)
    processor.video_processor.save_pretrained(out)
    # `TokenizersBackend` is transformers 5's name for the class; `PreTrainedTokenizerFast` names the same class there
    # and is also understood by transformers 4.x.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
