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
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwenvl_mcore.models.qwen3_vl_moe.config import released_config_dict

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
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------

#: Special tokens of the Qwen3-VL vocabulary, in the order Qwen numbers them (they follow the BPE vocabulary).
QWEN_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Size the BPE trainer aims at (256 byte tokens + merges); the special tokens come on top.
_BPE_VOCAB_TARGET = 480

# A small English corpus written for these fixtures: chat-like questions and answers about pictures and clips,
# the words the sample conversations use, digits and punctuation.
_CORPUS = """
The quick brown fox jumps over the lazy dog near the river bank.
A red square and a blue circle are drawn on a white picture.
What is shown in this image? Describe the picture in one short sentence.
The video shows a green ball moving from the left side to the right side.
Please describe what happens in the video, and say when the ball stops.
There are two images: the first one has a yellow triangle, the second one has stripes.
Compare the two pictures and tell me which one is brighter.
You are a helpful assistant. Answer the question about the image and the video.
The answer is short: a cat is sitting on a mat, and a bird is flying in the sky.
Count the objects: one, two, three, four, five, six, seven, eight, nine, ten.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 48 64 100 2025 appear in text too.
The time stamps of the frames are given in seconds, for example 0.5 seconds and 1.5 seconds.
Hello world! How are you today? I am fine, thank you. Good morning and good night.
Mixture of experts models route every token to a few experts chosen by a router.
Vision language models read images and videos and write text about them.
The model looks at the picture, finds the shapes, and names their colors.
A small house with a black roof stands next to a tall tree in the garden.
Children play with a ball in the park while their parents read books on a bench.
The weather is sunny and warm; later there will be rain and some wind.
Language, vision, and time: the three axes of the rotary position embedding.
This is a test of the tokenizer. It should split words into pieces and join them back.
The assistant said: "The image shows a circle." The user asked: "What color is it?"
"""


def _corpus_lines() -> list[str]:
    lines = [line.strip() for line in _CORPUS.strip().splitlines() if line.strip()]
    # Repeat so that frequent pairs clearly win; order is fixed, so training is deterministic.
    return lines * 4


# The chat template, written for these fixtures. It renders what Qwen3-VL's released template renders for plain
# chats: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, images and videos as
# `<|vision_start|><|image_pad|><|vision_end|>` / `<|vision_start|><|video_pad|><|vision_end|>` in place,
# optional "Picture N: " / "Video N: " labels (`add_vision_id`), and `<|im_start|>assistant\n` as generation prompt.
# No default system message is inserted (Qwen3-VL does not insert one). Tools and reasoning blocks are not handled.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Digits are split one by one (as Qwen does), then GPT-2 style byte-level pre-tokenisation.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_TARGET,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tok.to_str()


def build_tokenizer():
    """Return a small deterministic byte-level BPE ``PreTrainedTokenizerFast`` with Qwen's special tokens.

    Contract: 256 byte tokens + BPE merges trained in-process on a fixed built-in corpus (the same vocabulary on every
    call and machine), then the :data:`QWEN_SPECIAL_TOKENS` as atomic special tokens with the highest ids;
    ``pad_token`` = ``<|endoftext|>``, ``eos_token`` = ``<|im_end|>``, no BOS, right padding; the chat template
    :data:`CHAT_TEMPLATE`. ``tokenizer.image_token_id`` etc. are set as on the released Qwen3-VL tokenizer.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tokenizer_json())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        padding_side="right",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    return tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2

# Images: at least 2x2 merged tokens (64x64 px), at most 3x3 merged tokens worth of pixels (96x96 px = 36 patches).
DEFAULT_MIN_PIXELS = 64 * 64
DEFAULT_MAX_PIXELS = 96 * 96
# Videos: the budget counts frames x height x width (before temporal merging).
DEFAULT_VIDEO_MIN_PIXELS = 2 * 64 * 64
DEFAULT_VIDEO_MAX_PIXELS = 8 * 64 * 96

# Qwen3-VL normalises pixels with mean = std = 0.5.
_IMAGE_MEAN = [0.5, 0.5, 0.5]
_IMAGE_STD = [0.5, 0.5, 0.5]


def build_processor(
    tokenizer=None,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    video_min_pixels: int = DEFAULT_VIDEO_MIN_PIXELS,
    video_max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS,
):
    """Return a ``Qwen3VLProcessor`` (``Qwen2VLImageProcessor`` + ``Qwen3VLVideoProcessor``) around ``tokenizer``.

    Contract: patch 16, spatial merge 2, temporal patch 2, mean = std = 0.5 (as released), tiny pixel budgets
    (images between ``min_pixels`` and ``max_pixels`` pixels, i.e. 16-36 patches by default; videos between
    ``video_min_pixels`` and ``video_max_pixels`` counted over all frames). The video processor samples frames at 2 fps
    by default like the released one; pass ``do_sample_frames=False`` together with ``video_metadata`` (fps) to keep
    every frame. The processor carries :data:`CHAT_TEMPLATE`.
    """
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": int(video_min_pixels), "longest_edge": int(video_max_pixels)},
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
        fps=2,
        min_frames=4,
        max_frames=64,
        do_sample_frames=True,
        cap_pixels_per_frame=False,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------

#: Text-model values of the tiny config (all dimensions pairwise different: 48 hidden, 64 q width, 32 kv width,
#: 16 head dim, 40 expert width, 80 fused gate/up width, 8 experts).
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,  # dense MLP width; unused unless `mlp_only_layers` is set
    "moe_intermediate_size": 40,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_hidden_layers": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.1,
    "router_aux_loss_coef": 0.001,
    "use_cache": True,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    },
}

#: Vision-model values of the tiny config (8x8 learned position table, so every sample grid is interpolated).
TINY_VISION_CONFIG: dict[str, Any] = {
    "depth": 3,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 56,
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "patch_size": PATCH_SIZE,
    "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    "spatial_merge_size": MERGE_SIZE,
    "num_position_embeddings": 64,
    "out_hidden_size": 48,
    "deepstack_visual_indexes": [0, 2],
    "initializer_range": 0.1,
}

_VOCAB_MULTIPLE = 64
_TOP_LEVEL_KEYS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "tie_word_embeddings",
)


def _merge(base: dict, extra: Mapping | None) -> dict:
    out = dict(base)
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def tiny_hf_config(tokenizer=None, **overrides):
    """Return the tiny ``Qwen3VLMoeConfig`` (transformers 5 class) matching :func:`build_tokenizer`.

    Contract: text hidden 48, 4 heads / 2 KV heads, head_dim 16, 8 experts top-2 (renormalised), moe width 40,
    4 layers, interleaved MRoPE sections [4, 2, 2], rope_theta 1e4; vision depth 3, hidden 32, 2 heads, MLP 56,
    patch 16, temporal patch 2, merge 2, 64 learned positions, DeepStack taps at blocks [0, 2], output 48;
    vocab = tokenizer size rounded up to a multiple of 64; image/video/vision start/end ids = the tokenizer's ids;
    untied embeddings. ``overrides``: ``text={...}`` / ``vision={...}`` (or ``text_config`` / ``vision_config``) are
    merged into the sub-configs (nested dicts such as ``rope_parameters`` are merged too); other keys set top-level
    fields (e.g. ``tie_word_embeddings=True``); a key the top level does not know but the text config does (e.g.
    ``num_hidden_layers=2``) goes to the text config.
    """
    from transformers import Qwen3VLMoeConfig

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = int(math.ceil(len(tokenizer) / _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE)

    text = dict(TINY_TEXT_CONFIG)
    text.update(
        vocab_size=vocab_size,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    vision = dict(TINY_VISION_CONFIG)
    top: dict[str, Any] = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }

    overrides = dict(overrides)
    text = _merge(text, overrides.pop("text", None))
    text = _merge(text, overrides.pop("text_config", None))
    vision = _merge(vision, overrides.pop("vision", None))
    vision = _merge(vision, overrides.pop("vision_config", None))
    for key, value in overrides.items():
        if key in _TOP_LEVEL_KEYS:
            top[key] = value
        elif key in TINY_TEXT_CONFIG or key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            text[key] = value
        else:
            top[key] = value
    text["tie_word_embeddings"] = bool(top["tie_word_embeddings"])
    if isinstance(vision.get("deepstack_visual_indexes"), tuple):
        vision["deepstack_visual_indexes"] = list(vision["deepstack_visual_indexes"])

    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **top)
    return config


# --------------------------------------------------------------------------------------------------------------------
# Model weights and checkpoints
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

#: Frame rate attached to the synthetic video (its metadata), so timestamps are idx / 4 s.
SAMPLE_VIDEO_FPS = 4.0
SAMPLE_VIDEO_FRAMES = 8


def sample_image(width: int = 80, height: int = 64, variant: int = 0):
    """Return a deterministic synthetic RGB ``PIL.Image``: background, a rectangle, an ellipse, a line and a label."""
    from PIL import Image, ImageDraw

    palette = [(230, 57, 70), (69, 123, 157), (42, 157, 143), (233, 196, 106), (38, 70, 83)]
    bg = palette[variant % len(palette)]
    img = Image.new("RGB", (width, height), tuple(255 - c // 2 for c in bg))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 8, height // 6, width // 2, height // 2 + 4], fill=palette[(variant + 1) % 5])
    draw.ellipse([width // 2, height // 3, width - 6, height - 6], fill=palette[(variant + 2) % 5], outline=(0, 0, 0))
    draw.line([0, height - 1, width - 1, 0], fill=palette[(variant + 3) % 5], width=2)
    draw.text((3, 2), f"img{variant}", fill=(0, 0, 0))
    return img


def sample_video(num_frames: int = SAMPLE_VIDEO_FRAMES, width: int = 96, height: int = 64) -> np.ndarray:
    """Return a deterministic ``uint8`` video ``[num_frames, height, width, 3]``: a square moving left to right."""
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    side = height // 3
    for t in range(num_frames):
        frame = frames[t]
        frame[..., 0] = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
        frame[..., 1] = (yy * 255 // max(height - 1, 1)).astype(np.uint8)
        frame[..., 2] = 40 + 20 * t
        x0 = (t * (width - side)) // max(num_frames - 1, 1)
        y0 = height // 3
        frame[y0 : y0 + side, x0 : x0 + side] = (250, 250, 30)
    return frames


def sample_video_metadata(video: np.ndarray, fps: float = SAMPLE_VIDEO_FPS) -> dict[str, Any]:
    """Return the ``video_metadata`` entry for an array video shown at ``fps`` with all of its frames kept.

    Pass it as ``video_metadata=[...]`` with ``do_sample_frames=False``; the processor then stamps each temporal patch
    with the mean time of its two frames (``<0.1 seconds>``, ``<0.6 seconds>``, ... at 4 fps).
    """
    n, h, w = video.shape[:3]
    return {
        "total_num_frames": int(n),
        "fps": float(fps),
        "duration": float(n / fps),
        "width": int(w),
        "height": int(h),
        "frames_indices": list(range(n)),
    }


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
