"""The tiny debug flavor's own assets, built locally: tokenizer, processor, HF config and sample media.

`model.flavor=debug` (the demo, CPU runs, the tests) needs a tokenizer and a processor and no hub can be reached,
so they are made here, deterministically:

* :func:`build_tokenizer` - a small byte-level BPE holding Qwen's special tokens and a Qwen3-VL style chat template;
* :func:`build_processor` - a ``Qwen3VLProcessor`` (image + video processors) with tiny pixel budgets;
* :func:`tiny_hf_config` - a ``Qwen3VLMoeConfig`` whose dimensions are all pairwise different, so that a transposed or
  mis-split weight cannot go unnoticed;
* :func:`sample_image`, :func:`sample_video`, :func:`sample_video_metadata` - synthetic media (the synthetic dataset).

Test fixtures built on these (random checkpoints, reference inputs) live in qwenvl_mcore/testing/tiny.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

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
