"""Tests of the local sample dataset writer (qwenvl_mcore.data.sample_data) and its CLI.

The records are read back here with a small independent reader of the four formats, so that the manifest's claims
(what is clean, what is bad and why) are checked against the files themselves, not against the writer's own code.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwenvl_mcore.data.sample import SKIP_REASONS
from qwenvl_mcore.data.sample_data import DIRTY_KINDS, SAMPLE_FORMATS, write_sample_dataset

ROOT = Path(__file__).resolve().parents[2]
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
OVERLONG = 600


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return out, write_sample_dataset(out)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    out = tmp_path_factory.mktemp("dirty")
    return out, write_sample_dataset(out, dirty_fraction=0.3, overlong_tokens=OVERLONG)


# --------------------------------------------------------------------------------------------------------------------
# An independent reader: every record as (messages [(role, text)], images, videos), media as paths or PNG bytes
# --------------------------------------------------------------------------------------------------------------------


def read_records(out: Path, manifest: dict) -> dict[tuple[str, int], dict]:
    """``{(file, line or row): raw}``: the JSONL line text, or the parquet row as a dict."""
    records = {}
    for name in manifest["files"]:
        if name.endswith(".parquet"):
            for row, record in enumerate(pq.read_table(out / name).to_pylist()):
                records[(name, row)] = record
        else:
            text = (out / name).read_text()
            assert text == "" or text.endswith("\n")
            lines = text.split("\n")[:-1]
            assert all(line.strip() for line in lines), "blank line in " + name
            for number, line in enumerate(lines, start=1):
                records[(name, number)] = line
    return records


def normalise(name: str, raw) -> tuple[list[tuple[str, str]], list, list]:
    """The record as ``([(role, text with <image>/<video> tags)], images, videos)``; a video is a path or a list of
    frame paths, a parquet image its ``{"bytes", "path"}`` struct."""
    if name.endswith(".parquet"):
        messages = json.loads(raw["messages"])
        return [(m["role"], m["content"]) for m in messages], list(raw["images"]), []
    record = json.loads(raw)
    if name == "messages.jsonl":
        return [(m["role"], m["content"]) for m in record["messages"]], record.get("images", []), \
            record.get("videos", [])
    if name == "sharegpt.jsonl":
        messages = [(SHAREGPT_ROLES.get(m["from"], m["from"]), m["value"]) for m in record["conversations"]]
        images = record.get("image", [])
        videos = record.get("video", [])
        return messages, [images] if isinstance(images, str) else images, [videos] if isinstance(videos, str) else \
            videos
    assert name == "openai.jsonl"
    messages, images, videos = [], [], []
    for m in record["messages"]:
        if isinstance(m["content"], str):
            messages.append((m["role"], m["content"]))
            continue
        text = []
        for part in m["content"]:
            if part["type"] == "text":
                text.append(part["text"])
            elif part["type"] == "image_url":
                images.append(part["image_url"]["url"])
                text.append("<image>")
            else:
                assert part["type"] == "video_url"
                videos.append(part["video_url"]["url"])
                text.append("<video>")
        messages.append((m["role"], " ".join(text)))
    return messages, images, videos


def media_files(video) -> list[str]:
    return video if isinstance(video, list) else [video]


def image_ok(source) -> bool:
    try:
        with Image.open(source) as img:
            img.load()
        return True
    except Exception:
        return False


def video_frames(path: Path) -> tuple[int, int]:
    """(decoded frames, frames the header declares); (0, 0) without a video stream."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            return 0, 0
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), stream.frames


def count_tags(messages, tag: str) -> int:
    return sum(text.count(tag) for _, text in messages)


def assert_good(out: Path, name: str, raw, manifest: dict) -> None:
    """A record the pipeline must accept: valid JSON, known roles, an assistant turn, no longer than the longest
    clean sample, tags matching media that exist and decode completely."""
    messages, images, videos = normalise(name, raw)
    assert messages and {role for role, _ in messages} <= ROLES
    assert any(role == "assistant" for role, _ in messages)
    assert all(text for _, text in messages)
    assert sum(len(text.split()) for _, text in messages) <= manifest["max_clean_words"]
    if name != "openai.jsonl":
        assert count_tags(messages, "<image>") == len(images)
        assert count_tags(messages, "<video>") == len(videos)
    for image in images:
        if isinstance(image, dict):  # parquet: embedded
            assert image["bytes"] and image_ok(io.BytesIO(image["bytes"]))
        else:
            assert (out / image).is_file() and image_ok(out / image)
    for video in videos:
        if isinstance(video, list):
            assert json.loads(raw).get("fps") == manifest["video_fps"]
            assert all(image_ok(out / frame) for frame in video)
        else:
            decoded, declared = video_frames(out / video)
            assert decoded == declared > 0


# --------------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------------


def all_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_bytes_every_run(tmp_path, dirty):
    out, manifest = dirty
    again = write_sample_dataset(tmp_path / "again", dirty_fraction=0.3, overlong_tokens=OVERLONG)
    assert again == manifest
    first, second = all_files(out), all_files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = write_sample_dataset(tmp_path / "other", seed=1, dirty_fraction=0.3, overlong_tokens=OVERLONG)
    assert other["bad"] != manifest["bad"]
    assert all_files(tmp_path / "other")["messages.jsonl"] != first["messages.jsonl"]


def test_clean_dataset_all_good(clean):
    out, manifest = clean
    assert manifest["files"] == ["messages.jsonl", "sharegpt.jsonl", "openai.jsonl", "data.parquet"]
    assert manifest["num_records"] == {"messages.jsonl": 16, "sharegpt.jsonl": 16, "openai.jsonl": 16,
                                       "data.parquet": 16, "total": 64}
    assert manifest["bad"] == [] and manifest["expected_skips"] == {} and manifest["num_clean"] == 64
    records = read_records(out, manifest)
    assert len(records) == 64
    for (name, _), raw in records.items():
        assert_good(out, name, raw, manifest)
    # Every kind, multi-turn and system prompts, both video forms, varied answer lengths.
    assert set(manifest["kinds"]) == {"text", "image", "two_images", "video", "image_video"}
    assert sum(manifest["kinds"].values()) == 64
    parsed = [normalise(name, raw) for (name, _), raw in records.items()]
    assert {sum(r == "assistant" for r, _ in m) for m, _, _ in parsed} == {1, 2, 3}
    assert any(m[0][0] == "system" for m, _, _ in parsed) and any(m[0][0] == "user" for m, _, _ in parsed)
    lengths = [len(t.split()) for m, _, _ in parsed for r, t in m if r == "assistant"]
    assert min(lengths) <= 8 and max(lengths) >= 33
    types = {m["type"] for m in manifest["media"].values()}
    assert types == {"image", "video", "frames"}


def test_media_decode_to_what_the_manifest_says(clean):
    out, manifest = clean
    low, high = manifest["image_sides"]
    on_disk = {p.relative_to(out).as_posix() for p in (out / "images").iterdir()}
    on_disk |= {p.relative_to(out).as_posix() + ("/" if p.is_dir() else "") for p in (out / "videos").iterdir()}
    assert on_disk == set(manifest["media"])  # nothing written that the manifest does not list
    for path, info in manifest["media"].items():
        if info["type"] == "image":
            with Image.open(out / path) as img:
                img.load()
                assert img.size == (info["width"], info["height"]) and img.mode == "RGB"
                assert low <= img.width <= high and low <= img.height <= high
            continue
        assert info["width"] % 16 == 0 and info["height"] % 16 == 0
        assert manifest["video_frames"][0] <= info["frames"] <= manifest["video_frames"][1]
        if info["type"] == "frames":
            frames = sorted((out / path).iterdir())
            assert len(frames) == info["frames"]
            arrays = []
            for frame in frames:
                with Image.open(frame) as img:
                    assert img.size == (info["width"], info["height"])
                    arrays.append(img.tobytes())
        else:
            with av.open(str(out / path)) as container:
                stream = container.streams.video[0]
                assert (stream.width, stream.height) == (info["width"], info["height"])
                assert stream.frames == info["frames"]
                assert abs(float(stream.average_rate) - manifest["video_fps"]) < 1e-6
                arrays = [f.to_ndarray(format="rgb24").tobytes() for f in container.decode(stream)]
            assert len(arrays) == info["frames"]
        assert len(set(arrays)) == len(arrays)  # a moving shape: every frame differs


def assert_bad(out: Path, name: str, raw, reason: str, overlong: int) -> None:
    """The record is bad in the stated way."""
    if reason == "bad_json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(raw)
        return
    messages, images, videos = normalise(name, raw)
    roles = [role for role, _ in messages]
    if reason == "bad_record":
        assert not messages or not set(roles) <= ROLES
    elif reason == "no_labels":
        assert "assistant" not in roles and "user" in roles
    elif reason == "too_long":
        assert sum(len(text.split()) for _, text in messages) > overlong
    elif reason == "media_mismatch":
        assert count_tags(messages, "<image>") == 2 and len(images) == 1
    elif reason == "missing_media":
        missing = [i for i in images if isinstance(i, dict) and not i["bytes"]]
        missing += [p for v in [*images, *videos] if not isinstance(v, dict) for p in media_files(v)
                    if not (out / p).exists()]
        assert missing
    elif reason == "corrupt_image":
        broken = [i for i in images if not image_ok(io.BytesIO(i["bytes"]) if isinstance(i, dict) else out / i)]
        assert len(broken) == 1
    elif reason == "corrupt_video":
        (video,) = videos
        try:
            decoded, declared = video_frames(out / video)
            assert decoded == 0 or decoded < declared
        except av.FFmpegError:
            pass
    else:
        raise AssertionError(f"unexpected reason {reason}")
    if reason not in ("missing_media", "corrupt_image", "corrupt_video"):  # the media themselves are fine
        assert all(image_ok(io.BytesIO(i["bytes"]) if isinstance(i, dict) else out / i) for i in images)
        assert all((out / p).is_file() for v in videos for p in media_files(v))


def test_dirty_dataset_bad_in_the_stated_way(dirty, clean):
    out, manifest = dirty
    records = read_records(out, manifest)
    bad = {(b["file"], b.get("line", b.get("row"))): b for b in manifest["bad"]}
    assert len(bad) == len(manifest["bad"])
    assert all(("line" in b) != ("row" in b) and ("row" in b) == b["file"].endswith(".parquet") for b in bad.values())
    for key, raw in records.items():
        if key in bad:
            assert_bad(out, key[0], raw, bad[key]["reason"], OVERLONG)
        else:
            assert_good(out, key[0], raw, manifest)
    # A clean record reads the same as in the clean dataset of the same seed: dirt only replaces samples.
    clean_records = read_records(*clean)
    for key, raw in records.items():
        if key not in bad:
            assert raw == clean_records[key]


def test_dirty_counts_add_up(dirty):
    out, manifest = dirty
    skips = manifest["expected_skips"]
    assert set(skips) <= set(SKIP_REASONS)
    assert sum(skips.values()) == len(manifest["bad"])
    for reason, count in skips.items():
        assert count == sum(b["reason"] == reason for b in manifest["bad"])
    assert skips["too_long"] == 4  # one per format
    assert len(manifest["bad"]) - 4 == round(0.3 * 64)
    assert manifest["num_clean"] + len(manifest["bad"]) == manifest["num_records"]["total"] == 68
    assert sum(manifest["kinds"].values()) == manifest["num_clean"]
    assert {(b["reason"], b["variant"]) for b in manifest["bad"] if b["reason"] != "too_long"} == set(DIRTY_KINDS)
    assert len(read_records(out, manifest)) == 68
    assert OVERLONG > manifest["max_clean_words"]


def test_small_and_single_format_datasets(tmp_path):
    # Fewer samples than dirty kinds: every sample is bad, each reason at most as often as needed.
    manifest = write_sample_dataset(tmp_path / "a", num_samples=5, dirty_fraction=0.1)
    assert len(manifest["bad"]) == 5 and manifest["num_clean"] == 0
    assert len({b["reason"] for b in manifest["bad"]}) == 5
    # Parquet only: no JSONL reasons, no videos; at least one of every kind it can express.
    out = tmp_path / "b"
    manifest = write_sample_dataset(out, num_samples=40, formats=("parquet",), dirty_fraction=0.05)
    expressible = {k for k in DIRTY_KINDS if k[0] not in ("bad_json", "corrupt_video") and k != ("missing_media",
                                                                                                   "video")}
    assert {(b["reason"], b["variant"]) for b in manifest["bad"]} == expressible
    assert manifest["files"] == ["data.parquet"] and manifest["media"] == {}
    records = read_records(out, manifest)
    bad = {b["row"]: b["reason"] for b in manifest["bad"]}
    for (name, row), raw in records.items():
        if row in bad:
            assert_bad(out, name, raw, bad[row], 0)
        else:
            assert_good(out, name, raw, manifest)
    # Rewriting a sample dataset in place replaces it entirely.
    manifest = write_sample_dataset(out, num_samples=8, formats=("messages",))
    assert sorted(p.name for p in out.iterdir()) == ["images", "manifest.json", "messages.jsonl", "videos"]
    assert len(all_files(out)) == 1 + 1 + len([m for m in manifest["media"].values() if m["type"] != "frames"]) + sum(
        m["frames"] for m in manifest["media"].values() if m["type"] == "frames")


def test_rejects_bad_arguments(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_sample_dataset(tmp_path)
    for kwargs in ({"num_samples": 0}, {"formats": ("csv",)}, {"formats": ()}, {"dirty_fraction": 1.5},
                   {"overlong_tokens": -1}, {"image_sides": (64, 32)}, {"video_frames": (0, 4)}, {"video_fps": 0}):
        with pytest.raises(ValueError):
            write_sample_dataset(tmp_path / "new", **kwargs)


def test_options_shape_the_media(tmp_path):
    manifest = write_sample_dataset(tmp_path, num_samples=24, formats=("messages", "openai"), image_sides=(20, 40),
                                    video_frames=(3, 3), video_fps=2.5)
    videos = [m for m in manifest["media"].values() if m["type"] != "image"]
    assert videos and all(m["frames"] == 3 and m["width"] == m["height"] == 32 for m in videos)
    assert all(20 <= m["width"] <= 40 for m in manifest["media"].values() if m["type"] == "image")
    mp4 = next(p for p, m in manifest["media"].items() if m["type"] == "video")
    assert video_frames(tmp_path / mp4) == (3, 3)
    lines = (tmp_path / "messages.jsonl").read_text().splitlines()
    assert all(json.loads(line).get("fps", 2.5) == 2.5 for line in lines)


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_sample_dataset", ROOT / "tools/data/make_sample_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    manifest = module.main(["--out", str(tmp_path), "--samples", "12", "--seed", "3", "--dirty-fraction", "0.5",
                            "--overlong-tokens", "400"])
    text = capsys.readouterr().out
    assert re.search(r"wrote 16 records", text) and "expected skips" in text
    assert manifest["seed"] == 3 and manifest["formats"] == list(SAMPLE_FORMATS)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
