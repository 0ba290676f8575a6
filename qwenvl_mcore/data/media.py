"""Load the media of a :class:`~qwenvl_mcore.data.conversation.MediaRef`: images as RGB ``PIL`` images, videos as
``uint8`` frame arrays with the metadata the Qwen3-VL processor stamps frame times from.

Bad media never raises anything but :class:`~qwenvl_mcore.data.sample.SkipSample`: ``missing_media`` (a file that
does not exist, empty bytes), ``corrupt_image`` or ``corrupt_video`` (cannot be opened or decoded, no frames,
truncated), each with a detail naming the file. Programming errors (a bad ``choose_frames``) raise as usual.

Videos are decoded with torchcodec when it can be imported (what transformers itself uses by default), else with
PyAV; either way only the frames that ``choose_frames`` picks are kept, so a long video is never held in memory.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from qwenvl_mcore.data.conversation import MediaRef
from qwenvl_mcore.data.sample import SkipSample

__all__ = ["ChooseFrames", "load_image", "load_video", "video_backend"]

#: ``choose_frames(total_num_frames, fps) -> frame indices`` (ascending, each in ``[0, total_num_frames)``).
ChooseFrames = Callable[[int, float], Sequence[int]]


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def load_image(ref: MediaRef) -> Image.Image:
    """Open, fully decode and return ``ref`` (``path`` or ``data``) as an upright RGB image.

    The whole file is decoded here (``Image.load``), so a truncated file is caught now rather than inside the
    processor. EXIF orientation is applied (as ``transformers.image_utils.load_image`` does) and transparency is
    composited onto white (as the processor's own RGB conversion and Qwen's tooling do; a plain ``convert("RGB")``
    would expose whatever colour lies under transparent pixels). Truncation is only detected while PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False (its default).

    Raises ``SkipSample("missing_media")`` for a missing file or empty bytes, ``SkipSample("corrupt_image")`` for
    anything PIL cannot decode; the detail names the file (``ref.describe()``).
    """
    what = ref.describe()
    source = _image_source(ref, what)
    try:
        with Image.open(source) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            return _to_rgb(image)
    except Exception as exc:  # PIL's format plugins raise many types (OSError, SyntaxError, ValueError, ...)
        raise SkipSample("corrupt_image", f"cannot decode image {what}: {type(exc).__name__}: {exc}") from exc


def _image_source(ref: MediaRef, what: str):
    if ref.path is not None:
        if not os.path.isfile(ref.path):
            raise SkipSample("missing_media", f"image file not found: {what}")
        return ref.path
    if ref.data is not None:
        if not ref.data:
            raise SkipSample("missing_media", f"empty image bytes: {what}")
        return io.BytesIO(ref.data)
    raise ValueError(f"an image MediaRef needs `path` or `data`, got {ref!r}")


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------------------------


def load_video(ref: MediaRef, choose_frames: ChooseFrames) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the frames of video ``ref`` that ``choose_frames(total_num_frames, fps)`` picks.

    Returns ``frames`` (``uint8 [T, H, W, 3]``, RGB, in the order of the chosen indices) and ``metadata`` with
    transformers' ``VideoMetadata`` fields: ``total_num_frames``, ``fps``, ``duration`` (seconds), ``width``,
    ``height`` and ``frames_indices`` (the chosen indices, a list of ints). Pass ``choose_frames`` the video
    processor's own sampling rule, so the frames are those transformers would sample.

    A video file (``path`` or ``data``) is read with :func:`video_backend`. A frame list (``frames`` with ``fps``)
    is a video of ``len(frames)`` frames at ``fps``; only the chosen frame files are read (via :func:`load_image`).

    Raises ``SkipSample``: ``missing_media`` (missing file or frame file, empty bytes); ``corrupt_video`` (cannot be
    opened, no video stream, no frames, no frame rate, a bad frame file, or fewer frames decodable than the chosen
    indices need, i.e. a truncated file); ``bad_record`` (a frame list without a positive ``fps``).
    """
    what = ref.describe()
    if ref.frames is not None:
        return _load_frame_list(ref, choose_frames, what)
    if ref.path is not None:
        if not os.path.isfile(ref.path):
            raise SkipSample("missing_media", f"video file not found: {what}")
    elif ref.data is not None:
        if not ref.data:
            raise SkipSample("missing_media", f"empty video bytes: {what}")
    else:
        raise ValueError(f"a video MediaRef needs `path`, `data` or `frames`, got {ref!r}")
    if video_backend() == "torchcodec":
        return _load_torchcodec(ref, choose_frames, what)
    return _load_pyav(ref, choose_frames, what)


@lru_cache(maxsize=1)
def video_backend() -> str:
    """``"torchcodec"`` when torchcodec imports (and finds its FFmpeg libraries), else ``"pyav"``."""
    try:
        import torchcodec.decoders
    except Exception:  # not installed, or installed without loadable FFmpeg libraries (RuntimeError, OSError)
        return "pyav"
    return "torchcodec" if hasattr(torchcodec.decoders, "VideoDecoder") else "pyav"


def _choose(choose_frames: ChooseFrames, total: int, fps: float) -> list[int]:
    indices = [int(i) for i in np.asarray(choose_frames(int(total), float(fps))).reshape(-1)]
    if not indices or min(indices) < 0 or max(indices) >= total:
        raise ValueError(f"choose_frames({total}, {fps}) returned indices outside [0, {total}): {indices}")
    return indices


def _metadata(total: int, fps: float, duration: float, frames: np.ndarray, indices: list[int]) -> dict[str, Any]:
    return {
        "total_num_frames": int(total),
        "fps": float(fps),
        "duration": float(duration),
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "frames_indices": list(indices),
    }


def _stack(frames: list[np.ndarray], what: str) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise SkipSample("corrupt_video", f"frames of {what} differ in size: {sorted(shapes)}")
    return np.ascontiguousarray(np.stack(frames), dtype=np.uint8)


def _load_frame_list(ref: MediaRef, choose_frames: ChooseFrames, what: str) -> tuple[np.ndarray, dict[str, Any]]:
    paths = ref.frames or []
    if not paths:
        raise SkipSample("corrupt_video", f"frame-list video without frames: {what}")
    if ref.fps is None or not float(ref.fps) > 0:
        raise SkipSample("bad_record", f"frame-list video {what} needs a positive fps, got {ref.fps!r}")
    fps = float(ref.fps)
    indices = _choose(choose_frames, len(paths), fps)
    loaded: dict[int, np.ndarray] = {}
    for i in indices:
        if i in loaded:
            continue
        try:
            loaded[i] = np.asarray(load_image(MediaRef(kind="image", path=paths[i])))
        except SkipSample as skip:
            if skip.reason == "missing_media":
                raise SkipSample("missing_media", f"frame {i} of {what}: {skip.detail}") from skip
            raise SkipSample("corrupt_video", f"frame {i} of {what}: {skip.detail}") from skip
    frames = _stack([loaded[i] for i in indices], what)
    return frames, _metadata(len(paths), fps, len(paths) / fps, frames, indices)


def _load_torchcodec(ref: MediaRef, choose_frames: ChooseFrames, what: str) -> tuple[np.ndarray, dict[str, Any]]:
    from torchcodec.decoders import VideoDecoder

    # The same decoder settings as transformers' `read_video_torchcodec`: "exact" scans the file, so num_frames is the
    # count of frames actually present (a truncated file reports fewer frames rather than failing later).
    try:
        decoder = VideoDecoder(
            ref.path if ref.path is not None else ref.data,
            dimension_order="NHWC",
            seek_mode="exact",
            num_ffmpeg_threads=0,
        )
        meta = decoder.metadata
        total = int(meta.num_frames or 0)
        fps = float(meta.average_fps or 0.0)
    except Exception as exc:  # torchcodec raises RuntimeError/ValueError for unreadable input and missing streams
        raise SkipSample("corrupt_video", f"cannot open video {what}: {type(exc).__name__}: {exc}") from exc
    if total <= 0:
        raise SkipSample("corrupt_video", f"video has no frames: {what}")
    if fps <= 0:
        raise SkipSample("corrupt_video", f"video has no frame rate: {what}")
    indices = _choose(choose_frames, total, fps)
    try:
        frames = decoder.get_frames_at(indices=indices).data.numpy()
    except Exception as exc:
        raise SkipSample(
            "corrupt_video", f"cannot decode frames {indices} of {what}: {type(exc).__name__}: {exc}"
        ) from exc
    if frames.shape[0] != len(indices):
        raise SkipSample("corrupt_video", f"decoded {frames.shape[0]} of {len(indices)} chosen frames of {what}")
    duration = float(meta.duration_seconds) if meta.duration_seconds else total / fps
    return np.ascontiguousarray(frames, dtype=np.uint8), _metadata(total, fps, duration, frames, indices)


def _load_pyav(ref: MediaRef, choose_frames: ChooseFrames, what: str) -> tuple[np.ndarray, dict[str, Any]]:
    import av

    def open_container():
        return av.open(ref.path if ref.path is not None else io.BytesIO(ref.data))

    # Frame count: the container header's count (`stream.frames`, what transformers' PyAV reader uses, so indices
    # agree with it) when it has one. Some containers (Matroska/WebM, some AVI/TS) leave it 0; then the video packets
    # are counted by demuxing without decoding (cheap: no pixels are produced; one packet per frame for every common
    # codec). duration x rate is not used: it is rounded, and often off by a frame at the end.
    try:
        with open_container() as container:
            if not container.streams.video:
                raise SkipSample("corrupt_video", f"no video stream in {what}")
            stream = container.streams.video[0]
            total = int(stream.frames or 0)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if total <= 0:
            with open_container() as container:
                stream = container.streams.video[0]
                total = sum(1 for packet in container.demux(stream) if packet.size)
    except SkipSample:
        raise
    except Exception as exc:  # PyAV raises FFmpegError, OSError, ValueError, EOFError, IndexError, ... per file
        raise SkipSample("corrupt_video", f"cannot open video {what}: {type(exc).__name__}: {exc}") from exc
    if total <= 0:
        raise SkipSample("corrupt_video", f"video has no frames: {what}")
    if not rate:
        raise SkipSample("corrupt_video", f"video has no frame rate: {what}")
    fps = float(rate)
    indices = _choose(choose_frames, total, fps)

    # Decode in order, keeping only the chosen frames and stopping after the last one.
    wanted, last = set(indices), max(indices)
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with open_container() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    # one scaler thread: a scaler with helper threads hangs in forked DataLoader workers
                    kept[i] = frame.to_ndarray(format="rgb24", threads=1)
                if i >= last:
                    break
    except Exception as exc:  # as above: whatever one file makes the decoder raise is that file's problem
        raise SkipSample(
            "corrupt_video", f"decoding failed after {decoded} frames of {what}: {type(exc).__name__}: {exc}"
        ) from exc
    if decoded <= last:
        raise SkipSample(
            "corrupt_video",
            f"only {decoded} of {total} frames decodable in {what} (frame {last} needed); the file is truncated",
        )
    frames = _stack([kept[i] for i in indices], what)
    return frames, _metadata(total, fps, total / fps, frames, indices)
