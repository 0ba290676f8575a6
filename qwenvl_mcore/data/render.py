"""Render a :class:`~qwenvl_mcore.data.conversation.Conversation` into a training
:class:`~qwenvl_mcore.data.sample.Sample`, exactly as transformers' Qwen3-VL processor and chat template would.

One :class:`Renderer` call: load the media (:mod:`qwenvl_mcore.data.media`; video frames chosen by the video
processor's own sampling rule), render the chat template to text, collapse the video wrappers
(:func:`collapse_video_wrappers`), run the processor once, and label the trained assistant turns from the token ids.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from qwenvl_mcore.data.conversation import Conversation
from qwenvl_mcore.data.media import load_image, load_video
from qwenvl_mcore.data.sample import Sample, SkipSample
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX

__all__ = ["TRAIN_ON", "RenderOptions", "Renderer", "collapse_video_wrappers"]

#: Values of ``RenderOptions.train_on``: every assistant turn, or only the last one.
TRAIN_ON = ("all", "last")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT = "assistant"


def collapse_video_wrappers(text: str, processor=None) -> str:
    """Replace each ``<|vision_start|><|video_pad|><|vision_end|>`` in ``text`` by a bare ``<|video_pad|>``.

    Feeding the result to the transformers 5.23 ``Qwen3VLProcessor`` yields the reference video token layout
    (``<t seconds><|vision_start|><|video_pad|>...<|vision_end|>`` per temporal patch, nothing around it).
    """
    start = getattr(processor, "vision_start_token", "<|vision_start|>")
    end = getattr(processor, "vision_end_token", "<|vision_end|>")
    video = getattr(processor, "video_token", "<|video_pad|>")
    return text.replace(f"{start}{video}{end}", video)


@dataclass
class RenderOptions:
    """How conversations are rendered; ``None`` means the processor's own setting.

    ``train_on``: ``"all"`` assistant turns or only the ``"last"`` one. ``system_prompt``: inserted as the first
    message of conversations without a system message. ``image_min_pixels`` / ``image_max_pixels``: the image
    processor's per-image pixel budget. ``video_fps`` / ``video_min_frames`` / ``video_max_frames``: the video
    processor's frame sampling. ``video_min_pixels`` / ``video_max_pixels``: the video processor's pixel budget,
    counted over all sampled frames (frames x height x width).
    """

    train_on: str = "all"
    system_prompt: str | None = None
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    video_fps: float | None = None
    video_min_frames: int | None = None
    video_max_frames: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"data.train_on must be one of {TRAIN_ON}, got {self.train_on!r}.")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"data.system_prompt must be a string or null, got {type(self.system_prompt).__name__}.")
        for name in ("image_min_pixels", "image_max_pixels", "video_min_frames", "video_max_frames",
                     "video_min_pixels", "video_max_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name} must be a positive integer or null, got {value!r}.")
        fps = self.video_fps
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps)
                                or fps <= 0):
            raise ValueError(f"data.video_fps must be a positive number or null, got {fps!r}.")
        for low, high in (("image_min_pixels", "image_max_pixels"), ("video_min_frames", "video_max_frames"),
                          ("video_min_pixels", "video_max_pixels")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"data.{low} ({lo}) must not exceed data.{high} ({hi}).")


class Renderer:
    """Renders conversations with ``processor`` (a transformers ``Qwen3VLProcessor``) under ``options``.

    Raises ``ValueError`` at construction when an option conflicts with the processor's own settings (e.g.
    ``image_min_pixels`` above the processor's max pixels) or the tokenizer lacks Qwen's chat tokens.
    """

    def __init__(self, processor, options: RenderOptions | None = None) -> None:
        self.processor = processor
        self.options = options = RenderOptions() if options is None else options
        tokenizer = processor.tokenizer
        self._im_start = self._token_id(tokenizer, IM_START)
        self._im_end = self._token_id(tokenizer, IM_END)
        # An assistant turn starts with <|im_start|> "assistant" "\n". The role's tokens never merge with the newline
        # (byte-level pre-tokenizers split letters from whitespace); the newline can merge with whitespace that opens
        # the answer (Qwen's "\n\n" token), which _trained_spans handles.
        self._role_ids = tokenizer.encode(ASSISTANT, add_special_tokens=False)
        newline = tokenizer.encode("\n", add_special_tokens=False)
        header = tokenizer.encode(ASSISTANT + "\n", add_special_tokens=False)
        if len(newline) != 1 or header != self._role_ids + newline:
            raise ValueError("the tokenizer does not split 'assistant\\n' into the role's tokens and one newline "
                             "token; assistant turns cannot be found from token ids.")
        self._newline = newline[0]

        self._images_kwargs = self._size_override(
            processor.image_processor, options.image_min_pixels, options.image_max_pixels, "image")
        video_processor = getattr(processor, "video_processor", None)
        self._videos_kwargs: dict[str, Any] = {}
        self._sampler = None
        self._temporal_patch = 1
        if video_processor is not None:
            self._videos_kwargs = self._size_override(
                video_processor, options.video_min_pixels, options.video_max_pixels, "video")
            self._sampler = self._frame_sampler(video_processor, options)
            self._temporal_patch = int(getattr(video_processor, "temporal_patch_size", 1) or 1)

    # ----------------------------------------------------------------------------------------------------------------

    def choose_frames(self, total_num_frames: int, fps: float) -> list[int]:
        """The frame indices the video processor samples from a ``total_num_frames`` video at ``fps``.

        Its own ``sample_frames`` with ``data.video_fps`` / ``video_min_frames`` / ``video_max_frames`` applied, i.e.
        what ``processor(videos=..., do_sample_frames=True)`` picks for the same video and settings.
        """
        if self._sampler is None:
            raise ValueError("the processor has no video processor; it cannot render videos.")
        from transformers.video_utils import VideoMetadata

        sampler, num_frames, fps_target = self._sampler
        metadata = VideoMetadata(total_num_frames=int(total_num_frames), fps=float(fps))
        indices = sampler.sample_frames(metadata, num_frames=num_frames, fps=fps_target)
        return [int(i) for i in indices]

    def render(self, conv: Conversation, *, index: int = -1, location: str = "") -> Sample:
        """Render ``conv`` into a :class:`Sample` (``index`` and ``location`` are recorded on it).

        Raises ``SkipSample`` (with ``location`` set) for bad media (see :mod:`~qwenvl_mcore.data.media`), a media
        count that differs from the image/video parts (``media_mismatch``), assistant headers in the token ids that do
        not match the assistant messages (``bad_record``: message text holding chat special tokens), nothing to
        train on (``no_labels``), or any exception of the chat template or the processor (``processor_error``, its
        type and message in the detail, e.g. an image with an aspect ratio above 200).
        """
        try:
            return self._render(conv, index, location)
        except SkipSample as skip:
            skip.at(location)
            raise

    # ----------------------------------------------------------------------------------------------------------------

    def _render(self, conv: Conversation, index: int, location: str) -> Sample:
        messages = list(conv.messages)
        if self.options.system_prompt is not None and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.options.system_prompt}]})
        n_images, n_videos = _count_parts(messages, "image"), _count_parts(messages, "video")
        if n_images != len(conv.images) or n_videos != len(conv.videos):
            raise SkipSample("media_mismatch", f"{n_images} image and {n_videos} video parts in the messages, but "
                                               f"{len(conv.images)} images and {len(conv.videos)} videos given")

        images = [load_image(ref) for ref in conv.images]
        videos, metadata = [], []
        for ref in conv.videos:
            frames, meta = load_video(ref, self.choose_frames)
            if frames.shape[0] < self._temporal_patch:
                # transformers' Qwen3-VL resize raises for clips shorter than one temporal patch.
                raise SkipSample("corrupt_video", f"{ref.describe()} has {frames.shape[0]} frame(s); Qwen3-VL needs "
                                                  f"at least {self._temporal_patch}")
            videos.append(frames)
            metadata.append(meta)

        try:
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            text = collapse_video_wrappers(text, self.processor)
            kwargs: dict[str, Any] = {}
            if images:
                kwargs["images"] = images
                if self._images_kwargs:
                    kwargs["images_kwargs"] = dict(self._images_kwargs)
            if videos:
                kwargs["videos"] = videos
                # Frames are already the sampled ones: keep them all, and stamp times from their original indices.
                kwargs["videos_kwargs"] = {
                    **self._videos_kwargs,
                    "video_metadata": [dict(m, frames_indices=list(m["frames_indices"])) for m in metadata],
                    "do_sample_frames": False,
                }
            out = self.processor(text=text, return_tensors="pt", **kwargs)
        except Exception as exc:  # transformers raises ValueError, TypeError, ... on one sample's media or text
            media = [ref.describe() for ref in (*conv.images, *conv.videos)]
            where = f" (media: {', '.join(media[:4])}{', ...' if len(media) > 4 else ''})" if media else ""
            raise SkipSample("processor_error", f"{type(exc).__name__}: {exc}{where}") from exc

        input_ids = out["input_ids"][0].long()
        n_assistant = sum(1 for m in messages if m.get("role") == ASSISTANT)
        spans = self._trained_spans(input_ids)
        if len(spans) != n_assistant:
            raise SkipSample("bad_record", f"found {len(spans)} assistant turns in the token ids but the conversation "
                                           f"has {n_assistant}; a message text likely contains {IM_START}/{IM_END}")
        if self.options.train_on == "last":
            spans = spans[-1:]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for start, end in spans:
            labels[start:end] = input_ids[start:end]
        if not spans or not bool((labels != IGNORE_INDEX).any()):
            raise SkipSample("no_labels", "no assistant turn to train on")

        def get(key: str, dtype: torch.dtype) -> torch.Tensor | None:
            value = out.get(key)
            return None if value is None else value.to(dtype)

        return Sample(
            input_ids=input_ids,
            labels=labels,
            pixel_values=get("pixel_values", torch.float32),
            image_grid_thw=get("image_grid_thw", torch.long),
            pixel_values_videos=get("pixel_values_videos", torch.float32),
            video_grid_thw=get("video_grid_thw", torch.long),
            index=index,
            location=location,
        )

    def _trained_spans(self, input_ids: torch.Tensor) -> list[tuple[int, int]]:
        """``[start, end)`` of each assistant answer plus its ``<|im_end|>``, in order.

        The answer starts after ``<|im_start|>assistant\\n``. When the answer opens with whitespace that the tokenizer
        merges into the newline (one "\\n\\n" token), that shared token is trained too: it carries answer text.
        """
        ids = input_ids.tolist()
        n_role = len(self._role_ids)
        ends = [i for i, t in enumerate(ids) if t == self._im_end]
        spans = []
        for pos in (i for i, t in enumerate(ids) if t == self._im_start):
            role_end = pos + 1 + n_role
            if ids[pos + 1:role_end] != self._role_ids or role_end >= len(ids):
                continue
            first = ids[role_end]
            if first == self._newline:
                start = role_end + 1
            elif self.processor.tokenizer.decode([first]).startswith("\n"):
                start = role_end
            else:  # e.g. a role such as "assistant2": not an assistant turn
                continue
            end = next((e for e in ends if e >= start), None)
            if end is None:
                raise ValueError(f"no {IM_END} closes the assistant turn at token {pos}; the chat template does not "
                                 "end turns with it.")
            spans.append((start, end + 1))
        return spans

    @staticmethod
    def _token_id(tokenizer, token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the processor's tokenizer has no {token} token; it is not a Qwen3-VL tokenizer.")
        return int(token_id)

    @staticmethod
    def _size_override(sub_processor, min_pixels: int | None, max_pixels: int | None, kind: str) -> dict[str, Any]:
        """``{"size": {...}}`` for the processor call's ``images_kwargs`` / ``videos_kwargs``, or ``{}``.

        transformers 5.23 takes a per-call pixel budget as ``size={"shortest_edge": min, "longest_edge": max}`` (the
        flat ``min_pixels``/``max_pixels`` call kwargs are deprecated); Qwen's resize needs both keys, so the one not
        overridden is filled from the processor's own setting.
        """
        if min_pixels is None and max_pixels is None:
            return {}
        size = sub_processor.size
        lo = int(min_pixels if min_pixels is not None else size["shortest_edge"])
        hi = int(max_pixels if max_pixels is not None else size["longest_edge"])
        if lo > hi:
            which = "min" if min_pixels is not None else "max"
            raise ValueError(f"data.{kind}_{which}_pixels gives a {kind} pixel budget of min {lo} > max {hi} (the "
                             f"other bound is the processor's); set data.{kind}_min_pixels and data.{kind}_max_pixels "
                             "together.")
        return {"size": {"shortest_edge": lo, "longest_edge": hi}}

    @staticmethod
    def _frame_sampler(video_processor, options: RenderOptions):
        """A copy of ``video_processor`` carrying the frame-sampling overrides, with the sample_frames arguments.

        transformers' Qwen3-VL ``sample_frames`` reads ``min_frames``/``max_frames`` from the instance, never from
        call kwargs, so the overrides are set on a private copy (the caller's processor is left as it is).
        """
        sampler = copy.copy(video_processor)
        if options.video_min_frames is not None:
            sampler.min_frames = options.video_min_frames
        if options.video_max_frames is not None:
            sampler.max_frames = options.video_max_frames
        min_frames, max_frames = getattr(sampler, "min_frames", None), getattr(sampler, "max_frames", None)
        if min_frames is not None and max_frames is not None and min_frames > max_frames:
            which = "max" if options.video_max_frames is not None else "min"
            raise ValueError(f"data.video_{which}_frames gives video frames min {min_frames} > max {max_frames} (the "
                             "other bound is the processor's); set data.video_min_frames and data.video_max_frames "
                             "together.")
        if options.video_fps is not None:
            # An explicit rate wins over a processor-configured frame count (transformers would refuse both).
            return sampler, None, float(options.video_fps)
        return sampler, getattr(sampler, "num_frames", None), getattr(sampler, "fps", None)


def _count_parts(messages: list[dict[str, Any]], kind: str) -> int:
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == kind)
    return count
