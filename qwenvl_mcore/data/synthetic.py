"""A deterministic synthetic multimodal SFT dataset rendered through a Qwen3-VL processor.

Stand-in for a real data pipeline: every sample is a system + user + assistant conversation of random words, with
zero, one image, one video or one of each, rendered by the processor exactly as real samples would be (chat template,
media placeholders expanded to the processor's token counts, pixel patches). Sample ``i`` depends only on
``(seed, i)``, so any rank can build any sample on its own and a resumed run sees the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qwenvl_mcore.data.render import collapse_video_wrappers
from qwenvl_mcore.data.sample import Sample
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX
from qwenvl_mcore.models.qwen3_vl_moe.debug_assets import (
    sample_image,
    sample_video,
    sample_video_metadata,
)

__all__ = ["SYNTHETIC_KINDS", "Sample", "SyntheticConversations"]

#: The sample kinds :class:`SyntheticConversations` can draw.
SYNTHETIC_KINDS = ("text", "image", "video", "image_video")

SYSTEM_PROMPT = "You are a helpful assistant."
# Frames per video; even, so that the temporal patch (2 frames) divides them.
VIDEO_FRAMES = (4, 8)
VIDEO_FPS = 4.0
# Image and frame sides in pixels (multiples of the 16 px patch); the processor resizes into its pixel budget.
MEDIA_SIDES = tuple(range(48, 113, 16))
END_OF_TURN = "<|im_end|>"

# Plain English words, mostly whole tokens of the tiny test tokenizer, so that sequences stay short.
WORDS = (
    "the", "a", "red", "blue", "green", "yellow", "black", "white", "small", "tall", "short", "quick", "brown",
    "fox", "dog", "cat", "bird", "ball", "circle", "square", "triangle", "picture", "image", "video", "house", "tree",
    "garden", "river", "sky", "park", "book", "moves", "stops", "shows", "sits", "flies", "left", "right", "side",
    "one", "two", "three", "and", "on", "in", "with", "from", "to", "is", "are", "what", "which", "describe",
)


@dataclass
class _Draw:
    """The random choices behind one sample, before rendering."""

    kind: str
    conversation: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)


class SyntheticConversations:
    """``num_samples`` deterministic synthetic conversations, rendered with ``processor`` (a ``Qwen3VLProcessor``).

    Sample ``i`` (see :meth:`conversation` for its messages): kind drawn from ``kinds``; user and assistant texts of
    ``min_words..max_words`` random words each, so lengths and trained-token counts vary; images from
    :func:`~qwenvl_mcore.models.qwen3_vl_moe.debug_assets.sample_image` (sides from 48 to 112 px); videos from
    :func:`~qwenvl_mcore.models.qwen3_vl_moe.debug_assets.sample_video` (4 or 8 frames at 4 fps, every frame kept) with the reference
    video token layout (:func:`~qwenvl_mcore.data.render.collapse_video_wrappers`). All randomness comes from a
    local generator seeded with ``(seed, i)``; the global RNG state is neither read nor changed.
    """

    def __init__(
        self,
        processor,
        num_samples: int,
        *,
        seed: int = 0,
        kinds: Sequence[str] = SYNTHETIC_KINDS,
        min_words: int = 2,
        max_words: int = 24,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"data.num_samples must be >= 1, got {num_samples}.")
        if seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {seed}.")
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in SYNTHETIC_KINDS]
        if not kinds or unknown:
            raise ValueError(f"data.kinds must be a non-empty subset of {SYNTHETIC_KINDS}, got {list(kinds)}.")
        if not 1 <= min_words <= max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got min_words={min_words}, max_words={max_words}.")
        self.processor = processor
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.kinds = kinds
        self.min_words, self.max_words = int(min_words), int(max_words)
        tokenizer = processor.tokenizer
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if self.end_of_turn_id is None or self.end_of_turn_id == tokenizer.unk_token_id:
            raise ValueError(f"the processor's tokenizer has no {END_OF_TURN} token; it is not a Qwen3-VL tokenizer.")

    def __len__(self) -> int:
        return self.num_samples

    def conversation(self, index: int) -> list[dict[str, Any]]:
        """The chat messages of sample ``index`` (system, user with media items, assistant answer as a string)."""
        return self._draw(self._check_index(index)).conversation

    def __getitem__(self, index: int) -> Sample:
        """Render sample ``index``; the result depends only on ``(seed, index)``."""
        index = self._check_index(index)
        draw = self._draw(index)
        full = self._process(draw, draw.conversation, add_generation_prompt=False)
        prompt = self._process(draw, draw.conversation[:-1], add_generation_prompt=True)
        input_ids = full["input_ids"][0]
        prompt_ids = prompt["input_ids"][0]
        n_prompt = prompt_ids.shape[0]
        # The prompt (everything up to and including "<|im_start|>assistant\n") must tokenize to a prefix of the
        # full sequence; otherwise the answer boundary is not a token boundary and the labels would be wrong.
        if n_prompt >= input_ids.shape[0] or not torch.equal(input_ids[:n_prompt], prompt_ids):
            raise ValueError(
                f"sample {index}: the rendered prompt is not a token prefix of the full conversation; the chat "
                "template or tokenizer does not render turns independently."
            )
        ends = (input_ids[n_prompt:] == self.end_of_turn_id).nonzero()
        if ends.numel() == 0:
            raise ValueError(f"sample {index}: no {END_OF_TURN} after the assistant answer.")
        # Train the answer and its <|im_end|> (the model must learn to stop), not the template's "\n" after it:
        # generation ends at <|im_end|>, so that newline is never predicted at inference time.
        answer_end = n_prompt + int(ends[0, 0]) + 1
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[n_prompt:answer_end] = input_ids[n_prompt:answer_end]
        return Sample(
            input_ids=input_ids.long(),
            labels=labels.long(),
            pixel_values=full.get("pixel_values"),
            image_grid_thw=full.get("image_grid_thw"),
            pixel_values_videos=full.get("pixel_values_videos"),
            video_grid_thw=full.get("video_grid_thw"),
            index=index,
        )

    # ----------------------------------------------------------------------------------------------------------------

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} out of range for {self.num_samples} samples.")
        return int(index)

    def _words(self, rng: np.random.Generator) -> str:
        count = int(rng.integers(self.min_words, self.max_words + 1))
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=count))

    def _draw(self, index: int) -> _Draw:
        # The draw order below is part of the dataset's definition: changing it changes every sample.
        rng = np.random.default_rng([self.seed, index])
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        user_items: list[dict[str, Any]] = []
        draw = _Draw(kind=kind, conversation=[])
        if kind in ("image", "image_video"):
            width, height = (int(s) for s in rng.choice(MEDIA_SIDES, size=2))
            draw.images.append(sample_image(width, height, variant=int(rng.integers(0, 100))))
            user_items.append({"type": "image"})
        if kind in ("video", "image_video"):
            frames = int(rng.choice(VIDEO_FRAMES))
            width, height = (int(s) for s in rng.choice(MEDIA_SIDES, size=2))
            draw.videos.append(sample_video(frames, width, height))
            user_items.append({"type": "video"})
        user_items.append({"type": "text", "text": self._words(rng) + "?"})
        answer = self._words(rng) + "."
        draw.conversation = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_items},
            {"role": "assistant", "content": answer},
        ]
        return draw

    def _process(self, draw: _Draw, messages: list[dict[str, Any]], *, add_generation_prompt: bool):
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # transformers 5.23 expands only <|video_pad|> and would leave an extra vision_start/end pair around the
        # per-frame blocks; collapsing the wrapper first gives the reference (Qwen) video token layout.
        text = collapse_video_wrappers(text, self.processor)
        kwargs: dict[str, Any] = {}
        if draw.images:
            kwargs["images"] = draw.images
        if draw.videos:
            # Keep every frame (no fps resampling) and stamp frames from the metadata's 4 fps.
            kwargs.update(
                videos=draw.videos,
                video_metadata=[sample_video_metadata(v, fps=VIDEO_FPS) for v in draw.videos],
                do_sample_frames=False,
            )
        return self.processor(text=text, return_tensors="pt", **kwargs)
