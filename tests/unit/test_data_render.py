"""Acceptance tests of ``qwenvl_mcore.data.render`` / ``media``: input ids, pixel values, grid_thw and labels equal what
transformers' processor and chat template give for the same conversation.

The reference never goes through the library: media are loaded by transformers itself (``load_image``,
``video_utils.load_video``) or decoded here with PyAV/PIL, the processor samples video frames itself
(``do_sample_frames=True``) with size and frame settings configured on the processor rather than per call, and labels
come from prefix renderings (the conversation up to each assistant turn with ``add_generation_prompt=True``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import load_image as hf_load_image
from transformers.video_utils import load_video as hf_load_video

from qwenvl_mcore.data.conversation import Conversation, MediaRef
from qwenvl_mcore.data.media import load_image, load_video
from qwenvl_mcore.data.render import Renderer, RenderOptions, collapse_video_wrappers
from qwenvl_mcore.data.sample import SkipSample
from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.tiny import build_processor, sample_image

IGNORE = -100
VIDEO_FPS = 6
VIDEO_FRAMES = 12
W, H = 96, 64
SYSTEM = "You are a helpful assistant."


def _hf_video_backend() -> str:
    # The decoder transformers itself picks by default (torchcodec when usable); the library must agree with it.
    from transformers.utils.import_utils import is_torchcodec_usable

    return "torchcodec" if is_torchcodec_usable(decode="video") else "pyav"


def t(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


IMG = {"type": "image"}
VID = {"type": "video"}


def video_frames(n: int = VIDEO_FRAMES) -> np.ndarray:
    """A deterministic clip: colour gradients and a square moving left to right."""
    yy, xx = np.mgrid[0:H, 0:W]
    frames = np.empty((n, H, W, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, ..., 0] = xx * 255 // (W - 1)
        frames[i, ..., 1] = yy * 255 // (H - 1)
        frames[i, ..., 2] = (30 + 17 * i) % 256
        x0 = i * (W - 24) // max(n - 1, 1)
        frames[i, 20:44, x0:x0 + 24] = (250, 250, 30)
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = VIDEO_FPS, options: dict | None = None) -> Path:
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("media")
    out: dict[str, Any] = {"root": root}
    for name, (w, h, variant) in {"img_a": (80, 64, 1), "img_b": (64, 96, 2), "img_big": (96, 96, 3),
                                  "img_small": (48, 32, 4)}.items():
        out[name] = root / f"{name}.png"
        sample_image(w, h, variant).save(out[name])
    jpeg = root / "photo.jpg"
    sample_image(96, 80, 5).save(jpeg, quality=90)
    out["jpeg"] = jpeg
    # "faststart" puts the header (with the frame count) first, so cutting the file leaves a readable, short video.
    out["mp4"] = write_video(root / "clip.mp4", video_frames(), options={"movflags": "faststart"})
    out["mkv"] = write_video(root / "clip.mkv", video_frames())  # Matroska: the header carries no frame count
    frame_dir = root / "frames"
    frame_dir.mkdir()
    out["frames"] = []
    for i, frame in enumerate(video_frames(8)):
        out["frames"].append(frame_dir / f"{i:03d}.png")
        Image.fromarray(frame).save(out["frames"][-1])
    return out


# --------------------------------------------------------------------------------------------------------------------
# The reference: transformers alone
# --------------------------------------------------------------------------------------------------------------------


def hf_video(kind: str, source) -> tuple[Any, Any]:
    """(all frames, metadata) as transformers (or plain PyAV/PIL) loads them, before any frame sampling."""
    if kind == "file":
        frames, metadata = hf_load_video(str(source), backend=_hf_video_backend())
        return frames, metadata
    if kind == "pyav_all":  # every decoded frame, counted by decoding (for containers without a header count)
        with av.open(str(source)) as container:
            stream = container.streams.video[0]
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
            fps = float(stream.average_rate)
        return frames, {"total_num_frames": len(frames), "fps": fps, "duration": len(frames) / fps,
                        "width": W, "height": H}
    paths, fps = source
    frames = np.stack([np.asarray(hf_load_image(str(p))) for p in paths])
    return frames, {"total_num_frames": len(paths), "fps": float(fps), "duration": len(paths) / fps,
                    "width": frames.shape[2], "height": frames.shape[1]}


def count_parts(messages, kind: str) -> int:
    return sum(1 for m in messages for p in m["content"] if isinstance(p, dict) and p.get("type") == kind)


def hf_process(processor, messages, images, videos, *, add_generation_prompt: bool, fps: float | None = None):
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = [v for v, _ in videos]
        kwargs["video_metadata"] = [copy.deepcopy(m) for _, m in videos]  # the processor writes frames_indices
        kwargs["do_sample_frames"] = True
        if fps is not None:
            kwargs["fps"] = fps
    return processor(text=text, return_tensors="pt", **kwargs)


def hf_reference(processor, messages, images, videos, *, train_on: str = "all", fps: float | None = None):
    """(processor output, labels) for ``messages``; labels from prefix renderings of each trained assistant turn."""
    full = hf_process(processor, messages, images, videos, add_generation_prompt=False, fps=fps)
    ids = full["input_ids"][0]
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(ids, IGNORE)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k in turns[-1:] if train_on == "last" else turns:
        prefix = messages[:k]
        n_img, n_vid = count_parts(prefix, "image"), count_parts(prefix, "video")
        prompt = hf_process(processor, prefix, images[:n_img], videos[:n_vid], add_generation_prompt=True,
                            fps=fps)["input_ids"][0]
        n = prompt.shape[0]
        assert torch.equal(ids[:n], prompt), "the prompt is not a token prefix of the full rendering"
        end = n + int((ids[n:] == im_end).nonzero()[0, 0]) + 1
        labels[n:end] = ids[n:end]
    return full, labels


def assert_matches(sample, full, labels):
    assert sample.input_ids.dtype == torch.long and sample.labels.dtype == torch.long
    assert sample.input_ids.dim() == 1 and sample.labels.shape == sample.input_ids.shape
    assert torch.equal(sample.input_ids, full["input_ids"][0])
    assert torch.equal(sample.labels, labels)
    for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
        got, want = getattr(sample, key), full.get(key)
        if want is None:
            assert got is None, key
            continue
        assert got is not None, key
        assert got.dtype == (torch.float32 if key.startswith("pixel") else torch.long), key
        assert torch.equal(got, want.to(got.dtype)), key


def timestamps(processor, ids) -> list[str]:
    return re.findall(r"<(\d+\.\d) seconds>", processor.tokenizer.decode(ids))


# --------------------------------------------------------------------------------------------------------------------
# Cases: (messages, images, videos, options, reference processor settings)
# --------------------------------------------------------------------------------------------------------------------


def _case(name: str, media: dict[str, Any]):
    """messages, image keys, videos [(kind, source)], RenderOptions kwargs, reference settings."""
    qa = [{"role": "user", "content": [t("What is shown here?")]},
          {"role": "assistant", "content": [t("A red square and a blue circle.")]}]
    multi = [{"role": "system", "content": [t(SYSTEM)]},
             {"role": "user", "content": [t("Hello world!")]},
             {"role": "assistant", "content": [t("Good morning.")]},
             {"role": "user", "content": [t("Count: one, two.")]},
             {"role": "assistant", "content": [t("Three, four.")]}]
    one_image = [{"role": "user", "content": [IMG, t("Describe the picture.")]},
                 {"role": "assistant", "content": [t("Two shapes.")]}]
    one_video = [{"role": "user", "content": [VID, t("Describe the video.")]},
                 {"role": "assistant", "content": [t("A ball moves to the right.")]}]
    mp4 = [("file", media["mp4"])]
    frames = [("frames", (media["frames"], 4))]
    cases = {
        "text": (qa, [], [], {}, {}),
        "multi_turn_all": (multi, [], [], {"train_on": "all"}, {}),
        "multi_turn_last": (multi, [], [], {"train_on": "last"}, {}),
        "answer_opens_with_whitespace": ([qa[0], {"role": "assistant", "content": [t("\n\n  Indented answer.")]}],
                                         [], [], {}, {}),
        "system_inserted": (qa, [], [], {"system_prompt": SYSTEM}, {"system": SYSTEM}),
        "system_kept": (multi, [], [], {"system_prompt": "IGNORED PROMPT"}, {}),
        "one_image": (one_image, ["img_a"], [], {}, {}),
        "two_images": ([{"role": "user", "content": [t("Compare"), IMG, t("and"), IMG, t(".")]},
                        {"role": "assistant", "content": [t("The first one is brighter.")]}],
                       ["img_a", "img_b"], [], {}, {}),
        "image_max_pixels": (one_image, ["img_big"], [], {"image_max_pixels": 64 * 64}, {"max_pixels": 64 * 64}),
        "image_min_pixels": (one_image, ["img_small"], [], {"image_min_pixels": 96 * 96, "image_max_pixels": 128 * 128},
                             {"min_pixels": 96 * 96, "max_pixels": 128 * 128}),
        "video": (one_video, [], mp4, {}, {}),
        "video_fps": (one_video, [], mp4, {"video_fps": 4.0}, {"fps": 4.0}),
        "video_fps_max_frames": (one_video, [], mp4, {"video_fps": 6.0, "video_max_frames": 6},
                                 {"fps": 6.0, "max_frames": 6}),
        "video_min_frames": (one_video, [], mp4, {"video_fps": 0.5, "video_min_frames": 6},
                             {"fps": 0.5, "min_frames": 6}),
        "video_pixels": (one_video, [], mp4, {"video_min_pixels": 2 * 32 * 32, "video_max_pixels": 4 * 32 * 64},
                         {"video_min_pixels": 2 * 32 * 32, "video_max_pixels": 4 * 32 * 64}),
        "video_mkv": (one_video, [], [("pyav_all", media["mkv"])], {}, {}),
        "frame_list": (one_video, [], frames, {}, {}),
        "frame_list_fps": (one_video, [], frames, {"video_fps": 4.0}, {"fps": 4.0}),
        "image_video": ([{"role": "system", "content": [t(SYSTEM)]},
                         {"role": "user", "content": [IMG, VID, t("What do they show?")]},
                         {"role": "assistant", "content": [t("A circle and a moving ball.")]},
                         {"role": "user", "content": [t("And now?"), IMG]},
                         {"role": "assistant", "content": [t("Stripes.")]}],
                        ["img_a", "img_b"], mp4, {"system_prompt": "unused"}, {}),
    }
    return cases[name]


CASES = ("text", "multi_turn_all", "multi_turn_last", "answer_opens_with_whitespace", "system_inserted", "system_kept",
         "one_image", "two_images", "image_max_pixels", "image_min_pixels", "video", "video_fps",
         "video_fps_max_frames", "video_min_frames", "video_pixels", "video_mkv", "frame_list", "frame_list_fps",
         "image_video")


def _media_ref(kind: str, source) -> MediaRef:
    if kind == "frames":
        paths, fps = source
        return MediaRef(kind="video", frames=[str(p) for p in paths], fps=fps)
    return MediaRef(kind="video", path=str(source))


def _reference_processor(processor, ref: dict[str, Any]):
    """The processor with the case's size / frame settings configured on it (not passed per call)."""
    sizes = {k: ref[k] for k in ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels") if k in ref}
    proc = build_processor(processor.tokenizer, **sizes) if sizes else copy.deepcopy(processor)
    for key in ("min_frames", "max_frames"):
        if key in ref:
            setattr(proc.video_processor, key, ref[key])
    return proc


def render_case(processor, media, name: str):
    messages, image_keys, videos, options, ref = _case(name, media)
    conv = Conversation(messages=copy.deepcopy(messages),
                        images=[MediaRef(kind="image", path=str(media[k])) for k in image_keys],
                        videos=[_media_ref(kind, src) for kind, src in videos])
    sample = Renderer(processor, RenderOptions(**options)).render(conv, index=7, location="data.jsonl:8")
    ref_messages = copy.deepcopy(messages)
    if "system" in ref:
        ref_messages.insert(0, {"role": "system", "content": [t(ref["system"])]})
    full, labels = hf_reference(
        _reference_processor(processor, ref),
        ref_messages,
        [hf_load_image(str(media[k])) for k in image_keys],
        [hf_video(kind, src) for kind, src in videos],
        train_on=options.get("train_on", "all"),
        fps=ref.get("fps"),
    )
    return sample, full, labels


@pytest.mark.parametrize("name", CASES)
def test_render_matches_transformers(processor, media, name):
    sample, full, labels = render_case(processor, media, name)
    assert_matches(sample, full, labels)
    assert sample.index == 7 and sample.location == "data.jsonl:8"
    assert sample.num_loss_tokens > 0


def test_case_effects(processor, media):
    """The options really change what they should (so the equalities above are not vacuous)."""
    decode = processor.tokenizer.decode
    text = {n: decode(render_case(processor, media, n)[0].input_ids) for n in ("system_inserted", "system_kept")}
    assert text["system_inserted"].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert "IGNORED PROMPT" not in text["system_kept"] and text["system_kept"].count("<|im_start|>system") == 1

    all_turns = render_case(processor, media, "multi_turn_all")[0]
    last_turn = render_case(processor, media, "multi_turn_last")[0]
    assert decode(all_turns.input_ids[all_turns.labels != IGNORE]) == "Good morning.<|im_end|>Three, four.<|im_end|>"
    assert decode(last_turn.input_ids[last_turn.labels != IGNORE]) == "Three, four.<|im_end|>"

    grids = {n: render_case(processor, media, n)[0].image_grid_thw.tolist()
             for n in ("image_max_pixels", "image_min_pixels")}
    assert grids == {"image_max_pixels": [[1, 4, 4]], "image_min_pixels": [[1, 6, 8]]}  # defaults: 6x6 and 4x6

    videos = {n: render_case(processor, media, n)[0]
              for n in ("video", "video_fps", "video_fps_max_frames", "video_min_frames", "video_pixels")}
    # 12 frames at 6 fps: 2 fps -> 4 frames, 4 fps -> 8, 6 fps capped at 6, 0.5 fps raised to 6; pixels shrink frames.
    assert {n: s.video_grid_thw[0, 0].item() for n, s in videos.items()} == {
        "video": 2, "video_fps": 4, "video_fps_max_frames": 3, "video_min_frames": 3, "video_pixels": 2}
    assert timestamps(processor, videos["video"].input_ids) == ["0.3", "1.5"]
    assert timestamps(processor, videos["video_fps_max_frames"].input_ids) == ["0.2", "0.9", "1.7"]
    assert videos["video_pixels"].video_grid_thw[0, 1:].prod() < videos["video"].video_grid_thw[0, 1:].prod()
    frame_list = render_case(processor, media, "frame_list_fps")[0]
    assert timestamps(processor, frame_list.input_ids) == ["0.1", "0.6", "1.1", "1.6"]  # 8 frames at 4 fps, all kept


def test_per_call_frame_limits_are_ignored_by_transformers(processor):
    """Why the renderer sets min/max frames on a copy of the video processor: transformers 5.23's Qwen3-VL
    ``sample_frames`` reads them from the instance, so a per-call ``max_frames`` has no effect (``fps`` does)."""
    video = video_frames(24)
    meta = {"total_num_frames": 24, "fps": 6.0}
    grid = processor(text="<|video_pad|>", videos=[video], video_metadata=[meta], do_sample_frames=True,
                     max_frames=4, return_tensors="pt")["video_grid_thw"]
    assert grid[0, 0].item() == 4  # 2 fps of a 4 s clip = 8 frames = 4 temporal patches, not max_frames=4 frames
    sampler = Renderer(processor, RenderOptions(video_max_frames=4))
    assert sampler.choose_frames(24, 6.0) == [0, 8, 15, 23]
    assert processor.video_processor.max_frames == 64  # the caller's processor is unchanged


def test_collapse_video_wrappers_moved(processor):
    text = "a<|vision_start|><|video_pad|><|vision_end|>b<|vision_start|><|image_pad|><|vision_end|>"
    assert collapse_video_wrappers(text, processor) == "a<|video_pad|>b<|vision_start|><|image_pad|><|vision_end|>"
    assert tiny.collapse_video_wrappers(text, processor) == collapse_video_wrappers(text)


# --------------------------------------------------------------------------------------------------------------------
# Media loading
# --------------------------------------------------------------------------------------------------------------------


def test_media_from_bytes_equals_files(media):
    image = load_image(MediaRef(kind="image", path=str(media["jpeg"])))
    assert image.mode == "RGB" and image.size == (96, 80)
    same = load_image(MediaRef(kind="image", data=media["jpeg"].read_bytes()))
    assert np.array_equal(np.asarray(image), np.asarray(same))

    calls = []

    def choose(total, fps):
        calls.append((total, fps))
        return [1, 5, 6, 11]

    frames, meta = load_video(MediaRef(kind="video", path=str(media["mp4"])), choose)
    again, meta2 = load_video(MediaRef(kind="video", data=media["mp4"].read_bytes()), choose)
    assert calls == [(12, 6.0), (12, 6.0)]
    assert frames.dtype == np.uint8 and frames.shape == (4, H, W, 3)
    assert np.array_equal(frames, again) and meta == meta2
    assert meta == {"total_num_frames": 12, "fps": 6.0, "duration": 2.0, "width": W, "height": H,
                    "frames_indices": [1, 5, 6, 11]}
    every, _ = hf_load_video(str(media["mp4"]), backend=_hf_video_backend())
    assert np.array_equal(frames, np.asarray(every)[[1, 5, 6, 11]])
    # Matroska has no frame count in its header: the frames are counted instead (transformers' PyAV reader sees 0).
    _, mkv_meta = load_video(MediaRef(kind="video", path=str(media["mkv"])), choose)
    assert mkv_meta["total_num_frames"] == 12


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    rgba.save(tmp_path / "clear.png")
    assert np.asarray(load_image(MediaRef(kind="image", path=str(tmp_path / "clear.png")))).max(axis=(0, 1)).tolist() \
        == [255, 255, 255]


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


def _bad_media(media: dict[str, Any], kind: str) -> tuple[str, MediaRef, str]:
    """(expected reason, the bad MediaRef, the file name the detail must contain)."""
    root: Path = media["root"]
    if kind == "missing_image":
        return "missing_media", MediaRef(kind="image", path=str(root / "nope.png")), "nope.png"
    if kind == "garbage_image":
        (root / "garbage.png").write_bytes(b"this is not an image at all" * 10)
        return "corrupt_image", MediaRef(kind="image", path=str(root / "garbage.png")), "garbage.png"
    if kind in ("truncated_png", "truncated_jpeg"):
        src = media["img_big"] if kind == "truncated_png" else media["jpeg"]
        data = src.read_bytes()
        cut = root / f"cut_{src.name}"
        cut.write_bytes(data[: len(data) // 2])
        return "corrupt_image", MediaRef(kind="image", path=str(cut)), cut.name
    if kind == "missing_video":
        return "missing_media", MediaRef(kind="video", path=str(root / "nope.mp4")), "nope.mp4"
    if kind == "truncated_video":
        data = media["mp4"].read_bytes()
        (root / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
        return "corrupt_video", MediaRef(kind="video", path=str(root / "cut.mp4")), "cut.mp4"
    if kind == "garbage_video":
        (root / "garbage.mp4").write_bytes(bytes(range(256)) * 20)
        return "corrupt_video", MediaRef(kind="video", path=str(root / "garbage.mp4")), "garbage.mp4"
    if kind == "zero_frame_video":  # a Matroska header cut before its first cluster: a stream without frames
        data = media["mkv"].read_bytes()
        (root / "empty.mkv").write_bytes(data[: data.index(b"\x1f\x43\xb6\x75")])
        return "corrupt_video", MediaRef(kind="video", path=str(root / "empty.mkv")), "empty.mkv"
    if kind == "no_stream_video":  # an mp4 container holding no video stream
        with av.open(str(root / "nostream.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=6)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            container.start_encoding()
        return "corrupt_video", MediaRef(kind="video", path=str(root / "nostream.mp4")), "nostream.mp4"
    if kind in ("corrupt_frame", "missing_frame"):
        frames = [str(p) for p in media["frames"]]
        bad = root / ("bad_frame.png" if kind == "corrupt_frame" else "gone_frame.png")
        if kind == "corrupt_frame":
            bad.write_bytes(b"\x89PNG broken")
        frames[0] = str(bad)
        reason = "corrupt_video" if kind == "corrupt_frame" else "missing_media"
        return reason, MediaRef(kind="video", frames=frames, fps=4), bad.name
    raise ValueError(kind)


BAD = ("missing_image", "garbage_image", "truncated_png", "truncated_jpeg", "missing_video", "truncated_video",
       "garbage_video", "zero_frame_video", "no_stream_video", "corrupt_frame", "missing_frame")


@pytest.mark.parametrize("kind", BAD)
def test_bad_media_is_skipped(processor, media, kind):
    reason, ref, name = _bad_media(media, kind)
    part = IMG if ref.kind == "image" else VID
    conv = Conversation(messages=[{"role": "user", "content": [part, t("What?")]},
                                  {"role": "assistant", "content": [t("Nothing.")]}],
                        images=[ref] if ref.kind == "image" else [], videos=[ref] if ref.kind == "video" else [])
    with pytest.raises(SkipSample) as info:
        Renderer(processor).render(conv, location="data.jsonl:3")
    assert info.value.reason == reason, str(info.value)
    assert name in info.value.detail
    assert info.value.location == "data.jsonl:3"


def test_truncated_video_detail_says_truncated(processor, media):
    _, ref, _ = _bad_media(media, "truncated_video")
    with pytest.raises(SkipSample, match="truncated"):
        load_video(ref, Renderer(processor).choose_frames)


def test_conversation_errors(processor, media):
    renderer = Renderer(processor)
    with pytest.raises(SkipSample) as info:
        renderer.render(Conversation(messages=[{"role": "user", "content": [t("Hello?")]}]), location="f:1")
    assert info.value.reason == "no_labels" and info.value.location == "f:1"
    with pytest.raises(SkipSample) as info:
        renderer.render(Conversation(messages=[{"role": "user", "content": [IMG, t("Hi")]},
                                               {"role": "assistant", "content": [t("Ok.")]}]))
    assert info.value.reason == "media_mismatch"


@pytest.mark.parametrize("kwargs, key", [
    ({"train_on": "first"}, "data.train_on"),
    ({"image_max_pixels": 0}, "data.image_max_pixels"),
    ({"image_min_pixels": 2.5}, "data.image_min_pixels"),
    ({"video_fps": -1.0}, "data.video_fps"),
    ({"video_min_frames": 8, "video_max_frames": 4}, "data.video_min_frames"),
    ({"video_min_pixels": 10, "video_max_pixels": 5}, "data.video_min_pixels"),
])
def test_option_validation(kwargs, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        RenderOptions(**kwargs)


def test_options_conflicting_with_processor(processor):
    with pytest.raises(ValueError, match="data.image_min_pixels"):
        Renderer(processor, RenderOptions(image_min_pixels=10**6))  # above the processor's max of 96x96
    with pytest.raises(ValueError, match="data.video_max_frames"):
        Renderer(processor, RenderOptions(video_max_frames=2))  # below the processor's min_frames of 4


# --------------------------------------------------------------------------------------------------------------------
# End to end: one conversation written in every file format, read by the dataset, equals transformers' reference
# --------------------------------------------------------------------------------------------------------------------


def _write_formats(root: Path, media: dict[str, Any], with_video: bool) -> list[Path]:
    """The two-turn conversation of `_e2e_messages` as messages / ShareGPT / OpenAI JSONL and (images only) parquet."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    img, vid = str(media["img_a"]), str(media["mp4"])
    q1 = "<image>What is this?" + ("<video>And this?" if with_video else "")
    turns = [("user", q1), ("assistant", "A red box."), ("user", "Sure?"), ("assistant", "Yes, quite sure.")]
    messages = {"messages": [{"role": "system", "content": SYSTEM}] + [{"role": r, "content": c} for r, c in turns],
                "images": [img], **({"videos": [vid]} if with_video else {})}
    sharegpt = {"system": SYSTEM, "conversations": [{"from": "human" if r == "user" else "gpt", "value": c}
                                                    for r, c in turns], "image": img,
                **({"video": vid} if with_video else {})}
    first = [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "What is this?"}]
    if with_video:
        first += [{"type": "video_url", "video_url": {"url": vid}}, {"type": "text", "text": "And this?"}]
    openai = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}] +
              [{"role": r, "content": c} for r, c in turns[1:]]}
    paths = []
    for name, record in (("messages", messages), ("sharegpt", sharegpt), ("openai", openai)):
        paths.append(root / f"{name}.jsonl")
        paths[-1].write_text(json.dumps(record) + "\n")
    if not with_video:
        paths.append(root / "data.parquet")
        pq.write_table(pa.table({"messages": [json.dumps(messages["messages"])],
                                 "images": [[{"bytes": Path(img).read_bytes(), "path": "a.png"}]]}), paths[-1])
    return paths


@pytest.mark.parametrize("with_video", [False, True], ids=["image", "image_video"])
def test_every_file_format_gives_the_transformers_rendering(processor, media, tmp_path, with_video):
    from qwenvl_mcore.data.mixing import DatasetSpec, MixedDataset

    paths = _write_formats(tmp_path, media, with_video)
    first = [IMG, t("What is this?")] + ([VID, t("And this?")] if with_video else [])
    messages = [{"role": "system", "content": [t(SYSTEM)]}, {"role": "user", "content": first},
                {"role": "assistant", "content": [t("A red box.")]}, {"role": "user", "content": [t("Sure?")]},
                {"role": "assistant", "content": [t("Yes, quite sure.")]}]
    videos = [hf_video("file", media["mp4"])] if with_video else []
    full, labels = hf_reference(processor, messages, [hf_load_image(str(media["img_a"]))], videos)
    assert int((labels != IGNORE).sum()) > 8  # both answers are trained
    dataset = MixedDataset([DatasetSpec(str(p)) for p in paths], Renderer(processor))
    assert len(dataset) == len(paths) == (3 if with_video else 4)
    for i, path in enumerate(paths):
        sample = dataset[i]
        assert not isinstance(sample, SkipSample), (path.name, sample)
        assert sample.location == f"{path}:{'row 0' if path.suffix == '.parquet' else 1}"
        assert_matches(sample, full, labels)
