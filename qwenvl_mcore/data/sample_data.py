"""A small, local multimodal SFT dataset on disk, clean or deliberately dirty, for tests, benchmarks and the demo.

:func:`write_sample_dataset` writes synthetic images (PNG), videos (MP4 and directories of frame PNGs) and the same
kind of conversations in every input format the data pipeline reads (``messages``, ``sharegpt``, ``openai`` JSONL
and a ``parquet`` file with embedded images), plus ``manifest.json``: what was written, and, in dirty mode, exactly
which records are bad and under which :data:`~qwenvl_mcore.data.sample.SKIP_REASONS` name the pipeline must skip
them. Everything is a function of the arguments: two runs write the same bytes (given the same Pillow, PyAV and
pyarrow builds, whose compressors, encoder and writer are part of the output).

Layout of ``out_dir``::

    manifest.json
    messages.jsonl  sharegpt.jsonl  openai.jsonl  data.parquet      (those of ``formats``)
    images/NNNN_K.png                                              (image K of sample NNNN)
    videos/NNNN.mp4  or  videos/NNNN/TTT.png                       (MP4 or frame-list video of sample NNNN)
"""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_mcore.data.sample import SKIP_REASONS

__all__ = ["DIRTY_KINDS", "FORMAT_FILES", "SAMPLE_FORMATS", "SAMPLE_KINDS", "write_sample_dataset"]

#: The input formats and the file each is written to.
FORMAT_FILES = {
    "messages": "messages.jsonl",
    "sharegpt": "sharegpt.jsonl",
    "openai": "openai.jsonl",
    "parquet": "data.parquet",
}
SAMPLE_FORMATS = tuple(FORMAT_FILES)
#: What the first user turn carries.
SAMPLE_KINDS = ("text", "image", "two_images", "video", "image_video")
# The parquet file embeds images only (no video column); the openai format gets MP4 videos only (a video_url is one
# address, there is no agreed way to give it a list of frame files).
_PARQUET_KINDS = ("text", "image", "two_images")
_FRAME_LIST_FORMATS = ("messages", "sharegpt")
_JSONL_FORMATS = ("messages", "sharegpt", "openai")
_TAG_FORMATS = ("messages", "sharegpt", "parquet")  # media given by <image>/<video> tags in the text

#: Every way a record is made bad in dirty mode: ``(reason, variant)``, the reason one of ``SKIP_REASONS``. A dirty
#: dataset has at least one of each that its formats can express (when there are enough samples).
DIRTY_KINDS = (
    ("bad_json", "truncated"),  # the JSONL line cut half-way
    ("bad_json", "single_quotes"),  # a Python repr instead of JSON
    ("missing_media", "image"),  # an image path that was never written (parquet: empty bytes, no such path)
    ("missing_media", "video"),  # a video (MP4 or frame directory) that was never written
    ("corrupt_image", "garbage"),  # a .png of random bytes
    ("corrupt_image", "truncated"),  # a real PNG cut half-way
    ("corrupt_video", "truncated"),  # an MP4 cut half-way through its frame data: fewer frames than its header says
    ("corrupt_video", "not_video"),  # a text file named .mp4
    ("corrupt_video", "zero_frames"),  # an MP4 container with no video frames
    ("media_mismatch", "extra_tag"),  # two <image> tags, one image
    ("media_mismatch", "dropped_image"),  # a two-image sample with its second image left out of the list
    ("bad_record", "unknown_role"),  # a message with role "narrator"
    ("bad_record", "no_messages"),  # an empty message list (text-only samples, so no media is left dangling)
    # sample.py counts "no assistant turn" as no_labels (nothing to train on), not as bad_record.
    ("no_labels", "no_assistant"),  # system and user turns only
)
assert all(reason in SKIP_REASONS for reason, _ in DIRTY_KINDS)

_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful visual assistant. Answer in plain words.",
    "Answer briefly and describe only what you see.",
)
# Plain English words, whole tokens of most BPE vocabularies (the idea of synthetic.WORDS), so lengths stay short.
_WORDS = (
    "the", "a", "red", "blue", "green", "yellow", "black", "white", "small", "large", "quick", "brown", "fox", "dog",
    "cat", "bird", "ball", "circle", "square", "line", "box", "picture", "image", "video", "frame", "house", "tree",
    "river", "sky", "park", "book", "moves", "stops", "shows", "sits", "flies", "left", "right", "top", "bottom",
    "one", "two", "three", "and", "on", "in", "with", "from", "to", "is", "are", "near", "above", "below", "next",
)
_QUESTION_STARTS = ("what", "which", "where", "describe", "how many", "is there", "why")
_OVERLONG_TEXT = "the quick brown fox jumps over the lazy dog near the river bank".split()
# Word-count ranges of answers: mostly short, some medium, a few long, so trained-token counts vary a lot.
_ANSWER_LENGTHS = ((1, 8, 0.5), (9, 32, 0.35), (33, 64, 0.15))
_USER_WORDS = (2, 24)
_FRAME_LIST_SHARE = 1 / 3  # of the videos in formats that allow frame lists


@dataclass
class _Plan:
    """The random choices behind one sample (before any corruption)."""

    index: int
    fmt: str
    kind: str
    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user text, assistant answer)
    layout: int = 0  # where the media go in the first user turn: 0 before the text, 1 after it, 2 inline
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height)
    video: tuple[int, int, int] | None = None  # (frames, width, height)
    frame_list: bool = False
    overlong: bool = False
    reason: str | None = None
    variant: str | None = None

    @property
    def has_mp4(self) -> bool:
        return self.video is not None and not self.frame_list


# ------------------------------------------------------------------------------------------------------------------
# Drawing and encoding
# ------------------------------------------------------------------------------------------------------------------


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _draw_image(rng: np.random.Generator, width: int, height: int, label: str):
    """A synthetic RGB ``PIL.Image``: background colour, 1-4 rectangles/ellipses, 1-2 lines and a text label."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), _colour(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        box = [x0, y0, max(x1, x0 + 4), max(y1, y0 + 4)]
        if rng.random() < 0.5:
            draw.rectangle(box, fill=_colour(rng), outline=(0, 0, 0))
        else:
            draw.ellipse(box, fill=_colour(rng))
    for _ in range(int(rng.integers(1, 3))):
        points = [int(v) for v in rng.integers(0, [width, height, width, height])]
        draw.line(points, fill=_colour(rng), width=int(rng.integers(1, 4)))
    # The bitmap font, not the default FreeType one: its rendering does not depend on the FreeType build.
    draw.text((2, 1), label, fill=(0, 0, 0), font=ImageFont.load_default_imagefont())
    return img


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no optimize pass, no metadata chunks: stable bytes
    return buf.getvalue()


def _video_frames(rng: np.random.Generator, frames: int, width: int, height: int) -> np.ndarray:
    """``uint8 [frames, height, width, 3]``: a colour gradient, a square or disc moving along a random line and a
    progress bar along the bottom edge, so that consecutive frames always differ."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.array(_colour(rng), dtype=np.int32)
    background = np.empty((height, width, 3), dtype=np.int32)
    background[..., 0] = base[0] // 2 + xx * 127 // max(width - 1, 1)
    background[..., 1] = base[1] // 2 + yy * 127 // max(height - 1, 1)
    background[..., 2] = base[2] // 2 + 64
    side = max(4, min(width, height) // 3)
    start = rng.integers(0, [width - side + 1, height - side + 1])
    end = rng.integers(0, [width - side + 1, height - side + 1])
    colour = np.array(_colour(rng), dtype=np.int32)
    disc = rng.random() < 0.5
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        frame = background.copy()
        x0, y0 = (start + (end - start) * t // max(frames - 1, 1)).astype(int)
        if disc:
            r = side / 2
            mask = (xx - x0 - r) ** 2 + (yy - y0 - r) ** 2 <= r * r
        else:
            mask = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
        frame[mask] = colour
        frame[height - 3 :, : (t + 1) * width // frames] = 255
        out[t] = frame.clip(0, 255)
    return out


def _write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    """Encode ``frames`` as MPEG-4 Part 2 in an MP4 with the index (moov) first; bit-exact and single-threaded so that
    the bytes depend on nothing but the frames (the encoder's slice split follows its thread count)."""
    import av

    rate = Fraction(fps).limit_denominator(1000)
    # faststart puts the index first, so that a file cut short still opens and declares more frames than it holds.
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact", "movflags": "+faststart"}) as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {"flags": "+bitexact", "qscale": "4"}
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _write_empty_mp4(path: Path, width: int, height: int, fps: float) -> None:
    """An MP4 container whose video stream never received a frame (it has no decodable video)."""
    import av

    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact", "movflags": "+faststart"}) as out:
        stream = out.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {"flags": "+bitexact"}
        out.start_encoding()
        for packet in stream.encode():
            out.mux(packet)


def _mdat_offset(data: bytes) -> int:
    """Byte offset of the payload of the top-level ``mdat`` box of an MP4 (where the frame data starts)."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        header = 8
        if size == 1:  # 64-bit size follows
            size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        if kind == b"mdat":
            return pos + header
        if size < header:
            break
        pos += size
    raise ValueError("no mdat box in the MP4 just written")


# ------------------------------------------------------------------------------------------------------------------
# Planning: which samples, which media, which are bad
# ------------------------------------------------------------------------------------------------------------------


def _words(rng: np.random.Generator, low: int, high: int) -> str:
    count = int(rng.integers(low, high + 1))
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=count))


def _question(rng: np.random.Generator) -> str:
    start = _QUESTION_STARTS[int(rng.integers(len(_QUESTION_STARTS)))]
    text = f"{start} {_words(rng, *_USER_WORDS)}?"
    return text[0].upper() + text[1:]


def _answer(rng: np.random.Generator) -> str:
    weights = np.array([w for _, _, w in _ANSWER_LENGTHS])
    low, high, _ = _ANSWER_LENGTHS[int(rng.choice(len(_ANSWER_LENGTHS), p=weights / weights.sum()))]
    text = _words(rng, low, high) + "."
    return text[0].upper() + text[1:]


def _plan_sample(seed: int, index: int, fmt: str, image_sides, video_sides, video_frames) -> _Plan:
    # The draw order below is part of the dataset's definition: changing it changes every sample. Dirty choices are
    # made elsewhere, so a clean record reads the same in a clean and a dirty dataset of the same seed.
    rng = np.random.default_rng([seed, index])
    kinds = _PARQUET_KINDS if fmt == "parquet" else SAMPLE_KINDS
    plan = _Plan(index=index, fmt=fmt, kind=kinds[int(rng.integers(len(kinds)))])
    if rng.random() < 0.5:
        plan.system = _SYSTEM_PROMPTS[int(rng.integers(len(_SYSTEM_PROMPTS)))]
    plan.turns = [(_question(rng), _answer(rng)) for _ in range(int(rng.integers(1, 4)))]
    plan.layout = int(rng.integers(3))
    n_images = {"image": 1, "two_images": 2, "image_video": 1}.get(plan.kind, 0)
    plan.image_sizes = [tuple(int(s) for s in rng.integers(image_sides[0], image_sides[1] + 1, size=2))
                        for _ in range(n_images)]
    if plan.kind in ("video", "image_video"):
        frames = int(rng.integers(video_frames[0], video_frames[1] + 1))
        width, height = (int(s) for s in rng.choice(video_sides, size=2))
        plan.video = (frames, width, height)
        plan.frame_list = fmt in _FRAME_LIST_FORMATS and bool(rng.random() < _FRAME_LIST_SHARE)
    return plan


def _overlong_plan(index: int, fmt: str, tokens: int) -> _Plan:
    # Each word is at least one token, so ``tokens`` words plus the template are strictly more than ``tokens``.
    words = [_OVERLONG_TEXT[i % len(_OVERLONG_TEXT)] for i in range(tokens)]
    return _Plan(index=index, fmt=fmt, kind="text", system=None, turns=[(" ".join(words) + "?", "Too long.")],
                 overlong=True, reason="too_long", variant="text")


def _fits(plan: _Plan, reason: str, variant: str) -> bool:
    """Whether ``plan`` can be made bad as ``(reason, variant)`` in exactly that one way."""
    if reason == "bad_json":
        return plan.fmt in _JSONL_FORMATS
    if reason == "missing_media":
        return bool(plan.image_sizes) if variant == "image" else plan.video is not None
    if reason == "corrupt_image":
        return bool(plan.image_sizes)
    if reason == "corrupt_video":
        return plan.has_mp4
    if reason == "media_mismatch":
        if plan.fmt not in _TAG_FORMATS:
            return False
        return plan.kind in ("image", "image_video") if variant == "extra_tag" else plan.kind == "two_images"
    if reason == "bad_record" and variant == "no_messages":
        return plan.kind == "text"
    return True  # bad_record/unknown_role, no_labels


def _assign_dirty(plans: list[_Plan], seed: int, count: int) -> None:
    """Mark ``count`` of ``plans`` bad: cycle through :data:`DIRTY_KINDS` (first variants of every reason, then the
    second ones, ...), each taking the first sample that fits in a seeded shuffle; a kind with no sample left drops
    out of the cycle."""
    order = [int(i) for i in np.random.default_rng([seed, 0x5EED_D127]).permutation(len(plans))]
    by_variant: dict[str, list[str]] = {}
    for reason, variant in DIRTY_KINDS:
        by_variant.setdefault(reason, []).append(variant)
    depth = max(len(v) for v in by_variant.values())
    cycle = [(r, v[d]) for d in range(depth) for r, v in by_variant.items() if d < len(v)]
    used: set[int] = set()
    assigned = 0
    while assigned < count and cycle:
        for kind in list(cycle):
            if assigned >= count:
                break
            pick = next((i for i in order if i not in used and _fits(plans[i], *kind)), None)
            if pick is None:
                cycle.remove(kind)
                continue
            used.add(pick)
            plans[pick].reason, plans[pick].variant = kind
            assigned += 1


def _possible_kinds(formats: tuple[str, ...]) -> int:
    """How many of :data:`DIRTY_KINDS` some format of ``formats`` can express (the minimum dirty count)."""
    jsonl = any(f in _JSONL_FORMATS for f in formats)
    tags = any(f in _TAG_FORMATS for f in formats)
    count = 0
    for reason, variant in DIRTY_KINDS:
        if reason in ("bad_json", "corrupt_video") or (reason == "missing_media" and variant == "video"):
            count += jsonl
        elif reason == "media_mismatch":
            count += tags
        else:
            count += 1
    return count


# ------------------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class _Media:
    """The media references of one sample as the records give them (relative paths, or embedded PNG bytes)."""

    images: list[str] = field(default_factory=list)
    image_bytes: list[dict[str, Any]] = field(default_factory=list)  # parquet only: {"bytes", "path"} structs
    video: str | list[str] | None = None  # MP4 path, or frame paths


def _segments(plan: _Plan, n_images: int, has_video: bool, extra_tag: bool) -> list[tuple[str, str]]:
    """The first user turn as ``("text", s)``, ``("image", "")`` and ``("video", "")`` pieces in order."""
    media = [("image", "")] * (n_images + int(extra_tag)) + [("video", "")] * int(has_video)
    question = plan.turns[0][0]
    if not media:
        return [("text", question)]
    if plan.layout == 0:
        return media + [("text", "\n" + question)]
    if plan.layout == 1:
        return [("text", question + "\n")] + media
    pieces: list[tuple[str, str]] = [("text", "Look at ")]
    for k, item in enumerate(media):
        pieces += [item] if k == 0 else [("text", " and "), item]
    return pieces + [("text", ". " + question)]


def _tag_text(segments: list[tuple[str, str]]) -> str:
    return "".join(text if kind == "text" else f"<{kind}>" for kind, text in segments)


def _conversation(plan: _Plan, first_user: Any, user_role: str, assistant_role: str) -> list[tuple[str, Any]]:
    """``(role, content)`` pairs for ``plan`` after its corruption (unknown role inserted, answers removed, ...)."""
    if plan.reason == "bad_record" and plan.variant == "no_messages":
        return []
    messages: list[tuple[str, Any]] = [("system", plan.system)] if plan.system is not None else []
    for t, (question, answer) in enumerate(plan.turns):
        messages.append((user_role, first_user if t == 0 else question))
        if plan.reason == "no_labels":
            break  # the first user turn only: no assistant turn anywhere
        if t == 0 and plan.reason == "bad_record":
            messages.append(("narrator", "Meanwhile " + answer[0].lower() + answer[1:]))
        messages.append((assistant_role, answer))
    return messages


def _messages_record(plan: _Plan, media: _Media, fmt: str, fps: float) -> dict[str, Any]:
    """The sample as a ``messages``-format record (also the parquet ``messages`` column, media given separately)."""
    images = list(media.images if fmt != "parquet" else media.image_bytes)
    extra_tag = plan.reason == "media_mismatch" and plan.variant == "extra_tag"
    n_tags = len(images)
    if plan.reason == "media_mismatch" and plan.variant == "dropped_image":
        images = images[:1]  # two <image> tags stay in the text
    text = _tag_text(_segments(plan, n_tags, media.video is not None, extra_tag))
    record: dict[str, Any] = {"messages": [{"role": r, "content": c} for r, c in _conversation(plan, text, "user",
                                                                                               "assistant")]}
    if fmt == "parquet":
        return {"messages": record["messages"], "images": images}
    if images:
        record["images"] = images
    if media.video is not None:
        record["videos"] = [media.video]
        if isinstance(media.video, list):
            record["fps"] = float(fps)  # frame files carry no rate
    return record


def _sharegpt_record(plan: _Plan, media: _Media, fps: float) -> dict[str, Any]:
    """``{"conversations": [{"from", "value"}], "image": path | [paths], "video": path | [[frame paths]], "fps"}``."""
    base = _messages_record(plan, media, "messages", fps)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    record: dict[str, Any] = {"conversations": [{"from": names.get(m["role"], m["role"]), "value": m["content"]}
                                                for m in base["messages"]]}
    images = base.get("images", [])
    if images:
        record["image"] = images[0] if len(images) == 1 else images
    if "videos" in base:
        # One MP4 as a plain path; a frame-list video as a list holding one list of frames (never ambiguous with a
        # list of several video paths).
        record["video"] = base["videos"][0] if isinstance(media.video, str) else base["videos"]
        if "fps" in base:
            record["fps"] = base["fps"]
    return record


def _openai_record(plan: _Plan, media: _Media) -> dict[str, Any]:
    """``{"messages": [{"role", "content": str | [{"type": "text" | "image_url" | "video_url", ...}]}]}``."""
    segments = _segments(plan, len(media.images), media.video is not None, extra_tag=False)
    images = iter(media.images)
    parts: list[dict[str, Any]] = []
    for kind, text in segments:
        if kind == "text":
            parts.append({"type": "text", "text": text.strip()})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": next(images)}})
        else:
            parts.append({"type": "video_url", "video_url": {"url": media.video}})
    if [p["type"] for p in parts] == ["text"]:
        parts = parts[0]["text"]  # text-only first turns as a plain string, the other common openai form
    return {"messages": [{"role": r, "content": c} for r, c in _conversation(plan, parts, "user", "assistant")]}


# ------------------------------------------------------------------------------------------------------------------
# The writer
# ------------------------------------------------------------------------------------------------------------------


def _prepare_out_dir(out: Path) -> None:
    """Create ``out``; clear a previous sample dataset there (one with a manifest); refuse any other non-empty
    directory rather than mix files with it."""
    if out.exists() and any(out.iterdir()):
        manifest = out / "manifest.json"
        if not manifest.is_file():
            raise FileExistsError(f"{out} is not empty and holds no sample dataset (manifest.json); not writing there.")
        for name in ("images", "videos"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in [*FORMAT_FILES.values(), "manifest.json"]:
            (out / name).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)


def write_sample_dataset(
    out_dir,
    *,
    num_samples: int = 64,
    seed: int = 0,
    formats=SAMPLE_FORMATS,
    dirty_fraction: float = 0.0,
    overlong_tokens: int = 0,
    image_sides=(48, 112),
    video_frames=(8, 16),
    video_fps: float = 4.0,
) -> dict:
    """Write the dataset into ``out_dir`` and return its manifest (also written as ``out_dir/manifest.json``).

    Samples ``0..num_samples-1`` go round-robin to ``formats`` (sample ``i`` to ``formats[i % F]``, at 1-based JSONL
    line / 0-based parquet row ``i // F``); each is an optional system prompt and 1-3 user/assistant turns of plain
    words, the first user turn carrying no media, one image, two images, one video or an image and a video (parquet:
    text and images only; openai: MP4 videos only). Images are PNGs with sides in ``image_sides`` (inclusive);
    videos have ``video_frames`` frames (inclusive) at ``video_fps``, sides multiples of 16 within ``image_sides``,
    written as MP4 (MPEG-4 Part 2) or, in the messages and sharegpt formats about a third of the time, as a
    directory of frame PNGs (given as a list of frame paths plus a record-level ``"fps"``). Paths are relative to
    ``out_dir``. Sample ``i`` depends only on ``(seed, i, its format)``.

    ``dirty_fraction``: that share of the samples (rounded; when > 0, at least one of each of :data:`DIRTY_KINDS` the
    formats can express, as far as ``num_samples`` goes) is made bad in exactly one way. ``overlong_tokens`` > 0 adds
    one more text-only record per format whose text alone is ``overlong_tokens`` words (more tokens than that): the
    pipeline skips them as ``too_long`` when ``data.seq_length == overlong_tokens`` (pick it well above any clean
    sample, whose text is at most ``manifest["max_clean_words"]`` words, tags included, plus its vision tokens).

    Manifest: ``files`` (the data files), ``num_records`` (per file and ``"total"``), ``expected_skips``
    (``{reason: count}``, non-zero only), ``bad`` (``{"file", "line" | "row", "reason", "variant", "sample",
    "detail"}`` in file order), ``media`` (``{path: {"type": "image" | "video" | "frames", "width", "height",
    "frames"}}`` for every intact media file written, a frame-list video as ``"videos/NNNN/"``), ``kinds`` (clean
    records per kind), the arguments and ``max_clean_words``. Same arguments, same bytes.
    """
    formats = tuple(formats)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    if not formats or len(set(formats)) != len(formats) or any(f not in FORMAT_FILES for f in formats):
        raise ValueError(f"formats must be distinct names from {SAMPLE_FORMATS}, got {list(formats)}.")
    if not 0.0 <= dirty_fraction <= 1.0:
        raise ValueError(f"dirty_fraction must be within [0, 1], got {dirty_fraction}.")
    if overlong_tokens < 0:
        raise ValueError(f"overlong_tokens must be >= 0, got {overlong_tokens}.")
    image_sides = (int(image_sides[0]), int(image_sides[1]))
    video_frames = (int(video_frames[0]), int(video_frames[1]))
    if not 8 <= image_sides[0] <= image_sides[1]:
        raise ValueError(f"image_sides must be (low, high) with 8 <= low <= high, got {image_sides}.")
    if not 1 <= video_frames[0] <= video_frames[1]:
        raise ValueError(f"video_frames must be (low, high) with 1 <= low <= high, got {video_frames}.")
    if not video_fps > 0:
        raise ValueError(f"video_fps must be > 0, got {video_fps}.")
    # Video sides: multiples of 16 (whole macroblocks, no encoder padding) within image_sides, at least one.
    video_sides = list(range(16 * math.ceil(image_sides[0] / 16), image_sides[1] + 1, 16)) or [
        16 * math.ceil(image_sides[0] / 16)]

    out = Path(out_dir)
    _prepare_out_dir(out)
    n_formats = len(formats)
    plans = [_plan_sample(seed, i, formats[i % n_formats], image_sides, video_sides, video_frames)
             for i in range(num_samples)]
    max_clean_words = max(_word_count(p) for p in plans)
    n_bad = 0
    if dirty_fraction > 0:
        n_bad = min(num_samples, max(round(dirty_fraction * num_samples), _possible_kinds(formats)))
        _assign_dirty(plans, seed, n_bad)
    if overlong_tokens > 0:
        plans += [_overlong_plan(num_samples + k, formats[(num_samples + k) % n_formats], overlong_tokens)
                  for k in range(n_formats)]

    media_index: dict[str, dict[str, Any]] = {}
    details: dict[int, str] = {}
    records: dict[str, list[Any]] = {f: [] for f in formats}
    for plan in plans:
        media, detail = _write_media(out, plan, seed, video_fps, media_index)
        if detail:
            details[plan.index] = detail
        if plan.fmt == "openai":
            record = _openai_record(plan, media)
        elif plan.fmt == "sharegpt":
            record = _sharegpt_record(plan, media, video_fps)
        else:
            record = _messages_record(plan, media, plan.fmt, video_fps)
        records[plan.fmt].append((plan, record))

    bad: list[dict[str, Any]] = []
    files: list[str] = []
    num_records: dict[str, int] = {}
    for fmt in formats:
        name = FORMAT_FILES[fmt]
        files.append(name)
        num_records[name] = len(records[fmt])
        if fmt == "parquet":
            _write_parquet(out / name, [r for _, r in records[fmt]])
        else:
            lines = []
            for plan, record in records[fmt]:
                line = json.dumps(record)
                if plan.reason == "bad_json":
                    line = line[: len(line) // 2] if plan.variant == "truncated" else repr(record)
                    details[plan.index] = f"{plan.variant} JSON line"
                lines.append(line + "\n")
            (out / name).write_text("".join(lines), encoding="utf-8")
        for position, (plan, _) in enumerate(records[fmt]):
            if plan.reason is None:
                continue
            where = {"row": position} if fmt == "parquet" else {"line": position + 1}
            bad.append({"file": name, **where, "reason": plan.reason, "variant": plan.variant, "sample": plan.index,
                        "detail": details.get(plan.index, _default_detail(plan, overlong_tokens))})
    num_records["total"] = sum(num_records[f] for f in files)

    expected: dict[str, int] = {}
    for entry in bad:
        expected[entry["reason"]] = expected.get(entry["reason"], 0) + 1
    kinds: dict[str, int] = {}
    for plan in plans:
        if plan.reason is None:
            kinds[plan.kind] = kinds.get(plan.kind, 0) + 1
    manifest = {
        "version": 1,
        "seed": seed,
        "num_samples": num_samples,
        "formats": list(formats),
        "dirty_fraction": dirty_fraction,
        "overlong_tokens": overlong_tokens,
        "image_sides": list(image_sides),
        "video_frames": list(video_frames),
        "video_fps": float(video_fps),
        "files": files,
        "num_records": num_records,
        "num_clean": num_records["total"] - len(bad),
        "expected_skips": {r: expected[r] for r in SKIP_REASONS if r in expected},
        "bad": bad,
        "kinds": {k: kinds[k] for k in SAMPLE_KINDS if k in kinds},
        "max_clean_words": max_clean_words,
        "media": dict(sorted(media_index.items())),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _word_count(plan: _Plan) -> int:
    """An upper bound on the whitespace-separated words of the sample's text in any format."""
    texts = ([plan.system] if plan.system else []) + [t for turn in plan.turns for t in turn]
    # Media add at most 3 tags and the "Look at ... and ... and" of the inline layout.
    return sum(len(t.split()) for t in texts) + (8 if plan.image_sizes or plan.video else 0)


def _default_detail(plan: _Plan, overlong_tokens: int) -> str:
    if plan.reason == "too_long":
        return f"{overlong_tokens} words of text, more than {overlong_tokens} tokens"
    if plan.reason == "media_mismatch":
        return "two <image> tags, one image"
    if plan.reason == "bad_record":
        return "a message with role 'narrator'" if plan.variant == "unknown_role" else "no messages"
    if plan.reason == "no_labels":
        return "no assistant turn"
    return plan.variant or ""


def _write_media(out: Path, plan: _Plan, seed: int, fps: float, index: dict[str, dict[str, Any]]):
    """Write (or, for missing_media, leave out) the media of ``plan``; return its :class:`_Media` and, for a
    corrupted medium, a detail string for the manifest."""
    media = _Media()
    detail = ""
    stem = f"{plan.index:04d}"
    for k, (width, height) in enumerate(plan.image_sizes):
        rel = f"images/{stem}_{k}.png"
        # Parquet rows embed the bytes under a bare file name; the details name what a reader of the row sees.
        name = rel if plan.fmt != "parquet" else f"embedded image {k} ({stem}_{k}.png)"
        data = _png_bytes(_draw_image(np.random.default_rng([seed, plan.index, 10 + k]), width, height,
                                      f"{stem}.{k}"))
        # The first image is the one made bad (the sample's only one, or the first of two).
        if k == 0 and plan.reason == "corrupt_image":
            if plan.variant == "garbage":
                data = np.random.default_rng([seed, plan.index, 99]).bytes(len(data) // 2 + 64)
                detail = f"{name}: {len(data)} random bytes"
            else:
                detail = f"{name}: PNG cut to {len(data) // 2} of {len(data)} bytes"
                data = data[: len(data) // 2]
        missing = k == 0 and plan.reason == "missing_media" and plan.variant == "image"
        if missing:
            detail = f"{rel} does not exist" if plan.fmt != "parquet" else f"{name}: empty bytes, no such file"
        if plan.fmt == "parquet":
            # An empty bytes field and a path that does not exist: missing however a reader resolves it.
            media.image_bytes.append({"bytes": b"" if missing else data, "path": f"{stem}_{k}.png"})
        elif not missing:
            (out / rel).write_bytes(data)
        media.images.append(rel)
        if plan.fmt != "parquet" and not missing and not (k == 0 and plan.reason == "corrupt_image"):
            index[rel] = {"type": "image", "width": width, "height": height, "frames": 1}
    if plan.video is None:
        return media, detail
    frames, width, height = plan.video
    array = _video_frames(np.random.default_rng([seed, plan.index, 20]), frames, width, height)
    missing = plan.reason == "missing_media" and plan.variant == "video"
    if plan.frame_list:
        rels = [f"videos/{stem}/{t:03d}.png" for t in range(frames)]
        media.video = rels
        if missing:
            return media, f"videos/{stem}/ does not exist"
        from PIL import Image

        (out / "videos" / stem).mkdir()
        for rel, frame in zip(rels, array):
            (out / rel).write_bytes(_png_bytes(Image.fromarray(frame)))
        index[f"videos/{stem}/"] = {"type": "frames", "width": width, "height": height, "frames": frames}
        return media, detail
    rel = f"videos/{stem}.mp4"
    media.video = rel
    if missing:
        return media, f"{rel} does not exist"
    path = out / rel
    if plan.reason != "corrupt_video":
        _write_mp4(path, array, fps)
        index[rel] = {"type": "video", "width": width, "height": height, "frames": frames}
    elif plan.variant == "truncated":
        _write_mp4(path, array, fps)
        data = path.read_bytes()
        start = _mdat_offset(data)
        cut = start + (len(data) - start) // 2
        path.write_bytes(data[:cut])
        detail = f"{rel}: cut to {cut} of {len(data)} bytes, half of its frame data ({frames} frames declared)"
    elif plan.variant == "not_video":
        path.write_bytes(b"this is not a video, only text in a file named .mp4\n" * 4)
        detail = f"{rel}: a text file"
    else:
        _write_empty_mp4(path, width, height, fps)
        detail = f"{rel}: an MP4 container with no video frames"
    return media, detail


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """``messages`` (JSON string, messages format) and ``images`` (list of ``{"bytes", "path"}``) columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("messages", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ])
    table = pa.table({"messages": [json.dumps(r["messages"]) for r in rows], "images": [r["images"] for r in rows]},
                     schema=schema)
    pq.write_table(table, path, compression="zstd")
