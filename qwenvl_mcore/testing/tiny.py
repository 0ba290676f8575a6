"""Tiny, fully local stand-ins for a released Qwen3-VL MoE checkpoint.

Everything here is built in-process, deterministically, with no model hub access:

* :func:`build_tokenizer` - a small byte-level BPE holding Qwen's special tokens and a Qwen3-VL style chat template;
* :func:`build_processor` - a ``Qwen3VLProcessor`` (image + video processors) with tiny pixel budgets;
* :func:`tiny_hf_config` - a ``Qwen3VLMoeConfig`` whose dimensions are all pairwise different, so that a transposed or
  mis-split weight cannot go unnoticed;
* :func:`save_tiny_hf_checkpoint` - a randomly initialised checkpoint directory in either the released on-disk expert
  layout or the layout transformers 5 itself writes;
* :func:`sample_inputs` - processor outputs for text, image, two images, video, image + video and a padded batch.

transformers (``Qwen3VLMoeForConditionalGeneration``) is the numerical reference that these fixtures feed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwenvl_mcore.models.qwen3_vl_moe.config import released_config_dict
# The debug flavor's assets live with the model (production code uses them); re-exported here for the tests.
from qwenvl_mcore.models.qwen3_vl_moe.debug_assets import (  # noqa: F401
    CHAT_TEMPLATE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    DEFAULT_VIDEO_MAX_PIXELS,
    DEFAULT_VIDEO_MIN_PIXELS,
    MERGE_SIZE,
    PATCH_SIZE,
    QWEN_SPECIAL_TOKENS,
    SAMPLE_VIDEO_FPS,
    SAMPLE_VIDEO_FRAMES,
    TEMPORAL_PATCH_SIZE,
    TINY_TEXT_CONFIG,
    TINY_VISION_CONFIG,
    _BPE_VOCAB_TARGET,
    _CORPUS,
    _IMAGE_MEAN,
    _IMAGE_STD,
    _TOP_LEVEL_KEYS,
    _VOCAB_MULTIPLE,
    _corpus_lines,
    _merge,
    _tokenizer_json,
    build_processor,
    build_tokenizer,
    sample_image,
    sample_video,
    sample_video_metadata,
    tiny_hf_config,
)

__all__ = [
    "QWEN_SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "SAMPLE_KINDS",
    "EXPERT_LAYOUTS",
    "build_tokenizer",
    "build_processor",
    "tiny_hf_config",
    "build_tiny_hf_model",
    "randomize_weights",
    "save_tiny_hf_checkpoint",
    "to_released_expert_layout",
    "sample_inputs",
    "collapse_video_wrappers",
    "sample_conversation",
    "sample_image",
    "sample_video",
    "sample_video_metadata",
    "hf_reference_forward",
]

# --------------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------------
# Sample inputs
# --------------------------------------------------------------------------------------------------------------------

#: The kinds :func:`sample_inputs` knows.
SAMPLE_KINDS = ("text", "image", "two_images", "video", "image_video", "padded_batch")

def sample_conversation(kind: str) -> list[list[dict[str, Any]]]:
    """Return the conversations (one per batch sample) behind :func:`sample_inputs` ``kind``, with an assistant answer.

    Content items are ``{"type": "text", "text": ...}``, ``{"type": "image"}``, ``{"type": "video"}``; the media
    themselves are passed to the processor separately (see :func:`sample_inputs`).
    """

    def chat(user_items, answer):
        return [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": user_items},
            {"role": "assistant", "content": answer},
        ]

    t = lambda s: {"type": "text", "text": s}  # noqa: E731
    if kind == "text":
        return [[{"role": "user", "content": "Hello world! How are you today?"},
                 {"role": "assistant", "content": "I am fine, thank you."}]]
    if kind == "image":
        return [chat([{"type": "image"}, t("What is shown in this image?")], "A red square and a blue circle.")]
    if kind == "two_images":
        return [chat([t("Compare"), {"type": "image"}, t("and"), {"type": "image"}, t(".")], "The first is brighter.")]
    if kind == "video":
        return [chat([{"type": "video"}, t("Describe the video.")], "A ball moves to the right.")]
    if kind == "image_video":
        return [chat([{"type": "image"}, {"type": "video"}, t("What do they show?")], "A circle and a moving ball.")]
    if kind == "padded_batch":
        return [
            chat([{"type": "image"}, t("Describe the picture in one short sentence.")], "Two shapes on a picture."),
            [{"role": "user", "content": "Count: one, two."}, {"role": "assistant", "content": "Three."}],
        ]
    raise ValueError(f"unknown sample kind {kind!r}; expected one of {SAMPLE_KINDS}")


def collapse_video_wrappers(text: str, processor=None) -> str:
    """:func:`qwenvl_mcore.data.render.collapse_video_wrappers` (it lives there now; this name is kept for imports).

    Imported on call, not at module level: ``qwenvl_mcore.data`` imports this module (through its synthetic
    dataset), so importing ``qwenvl_mcore.data.render`` here first would be circular.
    """
    from qwenvl_mcore.data.render import collapse_video_wrappers as collapse

    return collapse(text, processor)


def sample_inputs(processor, kind: str, *, reference_video_layout: bool = True):
    """Return the processor's ``BatchFeature`` (PyTorch tensors) for one of :data:`SAMPLE_KINDS`.

    Contract: conversations from :func:`sample_conversation` rendered with the chat template (no generation prompt,
    assistant answer included), media drawn deterministically: "image" one 80x64 image (grid 1x4x4, 4 tokens);
    "two_images" 80x64 and 64x96 images in one sample; "video" an 8-frame 96x64 clip at 4 fps with metadata, no
    frame sampling (grid 4x4x6, timestamps ``<0.1 seconds>``, ``<0.6 seconds>``, ... in the text);
    "image_video" one of each; "padded_batch" two samples (the first with an image) right-padded with
    ``<|endoftext|>`` and ``attention_mask`` zeros. Keys: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``
    and, where present, ``pixel_values``/``image_grid_thw``/``pixel_values_videos``/``video_grid_thw``.

    Videos: the chat template writes ``<|vision_start|><|video_pad|><|vision_end|>`` like the released one. The
    Qwen3-VL processor of transformers 4.57 (and Qwen's own tooling) replaces that whole triple by
    ``<t seconds><|vision_start|>pads<|vision_end|>`` per temporal patch; transformers 5.23 replaces only the
    ``<|video_pad|>``, which leaves an extra ``<|vision_start|>`` ... ``<|vision_end|>`` around the frames. With
    ``reference_video_layout=True`` (default) the triple is collapsed to ``<|video_pad|>`` before the processor runs,
    so the token stream is the reference one; ``False`` gives what transformers 5.23 produces from the template.
    """
    conversations = sample_conversation(kind)
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in conversations]
    if reference_video_layout:
        texts = [collapse_video_wrappers(t, processor) for t in texts]
    images: list | None = None
    videos: list | None = None
    kwargs: dict[str, Any] = {}
    if kind == "image":
        images = [sample_image(80, 64, 0)]
    elif kind == "two_images":
        images = [sample_image(80, 64, 1), sample_image(64, 96, 2)]
    elif kind in ("video", "image_video"):
        video = sample_video()
        videos = [video]
        kwargs.update(video_metadata=[sample_video_metadata(video)], do_sample_frames=False)
        if kind == "image_video":
            images = [sample_image(96, 96, 3)]
    elif kind == "padded_batch":
        images = [sample_image(96, 64, 4)]
    elif kind != "text":
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {SAMPLE_KINDS}")
    return processor(
        text=texts if len(texts) > 1 else texts[0],
        images=images,
        videos=videos,
        padding=len(texts) > 1,
        padding_side="right",
        return_tensors="pt",
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------------------------
# Reference forward
# --------------------------------------------------------------------------------------------------------------------

_MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)


@torch.no_grad()
def hf_reference_forward(model, batch: Mapping[str, Any]) -> torch.Tensor:
    """Run ``model`` (a ``Qwen3VLMoeForConditionalGeneration``) on ``batch`` without cache; return logits [B, S, V].

    Only the model inputs of the processor's output are passed; ``model.model.rope_deltas`` is reset first so a
    previous call cannot leak position offsets into this one.
    """
    inputs = {k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch and batch[k] is not None}
    if hasattr(model, "model") and hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None
    out = model(**inputs, use_cache=False)
    return out.logits
