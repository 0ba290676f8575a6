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

from collections.abc import Mapping
from typing import Any

import torch

# The debug flavor's assets and checkpoint writer live with the model (production code, the demo included, uses
# them; production code never imports qwenvl_mcore.testing); re-exported here for the tests.
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
from qwenvl_mcore.models.qwen3_vl_moe.debug_checkpoint import (  # noqa: F401
    EXPERT_LAYOUTS,
    build_tiny_hf_model,
    randomize_weights,
    save_tiny_hf_checkpoint,
    to_released_expert_layout,
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
