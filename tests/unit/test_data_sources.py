"""Tests of dataset sources (JSON Lines, parquet) and of record parsing in every format into one Conversation."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.conversation import Conversation, MediaRef
from qwenvl_mcore.data.formats import FORMATS, detect_format, parse_record
from qwenvl_mcore.data.sample import SkipSample
from qwenvl_mcore.data.sources import JsonlSource, ParquetSource, open_source

BASE = "/data/set"
PNG = b"\x89PNG\r\n\x1a\nfake image bytes"
PNG_B64 = base64.b64encode(PNG).decode()


def text(s):
    return {"type": "text", "text": s}


IMAGE, VIDEO = {"type": "image"}, {"type": "video"}


def msg(role, *parts):
    return {"role": role, "content": list(parts)}


def skip_reason(record, **kwargs) -> SkipSample:
    with pytest.raises(SkipSample) as info:
        parse_record(record, base_dir=BASE, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------------------------------
# messages (ms-swift) format
# --------------------------------------------------------------------------------------------------------------------


def test_messages_format_tags_become_parts_in_place_with_every_media_entry_kind():
    record = {
        "messages": [
            {"role": "system", "content": "  Be brief.\n"},
            {"role": "user", "content": "<image>\nCompare <image> and <image><image> with <video>, <video> and<video>"},
            {"role": "assistant", "content": "They differ. "},
            {"role": "user", "content": "<video>"},
            {"role": "assistant", "content": "A dog."},
        ],
        "images": [
            "a.jpg",  # relative: against base_dir
            {"path": "/abs/b.png"},
            {"bytes": PNG_B64},
            f"data:image/png;base64,{PNG_B64}",
        ],
        "videos": ["clips/v.mp4", ["f/0.jpg", "/abs/1.jpg"], {"frames": ["g0.jpg"], "fps": 4}, {"path": "/abs/w.mp4"}],
        "fps": 3,
    }
    conv = parse_record(record, fmt="messages", base_dir=BASE)
    assert conv == Conversation(
        messages=[
            msg("system", text("  Be brief.\n")),
            msg("user", IMAGE, text("\nCompare "), IMAGE, text(" and "), IMAGE, IMAGE, text(" with "), VIDEO,
                text(", "), VIDEO, text(" and"), VIDEO),
            msg("assistant", text("They differ. ")),
            msg("user", VIDEO),
            msg("assistant", text("A dog.")),
        ],
        images=[
            MediaRef("image", path="/data/set/a.jpg"),
            MediaRef("image", path="/abs/b.png"),
            MediaRef("image", data=PNG),
            MediaRef("image", data=PNG),
        ],
        videos=[
            MediaRef("video", path="/data/set/clips/v.mp4"),
            MediaRef("video", frames=["/data/set/f/0.jpg", "/abs/1.jpg"], fps=3.0),  # the record's fps
            MediaRef("video", frames=["/data/set/g0.jpg"], fps=4.0),  # its own fps wins
            MediaRef("video", path="/abs/w.mp4"),
        ],
    )
    assert detect_format(record) == "messages"
    assert parse_record(record, base_dir=BASE) == conv  # auto


def test_media_dir_and_default_frames_fps():
    record = {
        "messages": [{"role": "user", "content": "<image><video>"}, {"role": "assistant", "content": "ok"}],
        "images": ["x/a.jpg"],
        "videos": [["0.jpg", "1.jpg"]],
    }
    conv = parse_record(record, base_dir=BASE, media_dir="/media", frames_fps=1.5)
    assert conv.images == [MediaRef("image", path="/media/x/a.jpg")]
    assert conv.videos == [MediaRef("video", frames=["/media/0.jpg", "/media/1.jpg"], fps=1.5)]
    assert conv.messages[0] == msg("user", IMAGE, VIDEO)
    assert parse_record(record, base_dir=BASE).videos[0].fps == 2.0


def test_string_only_message_is_one_text_part_and_empty_system_is_allowed():
    record = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": " hi "},
                           {"role": "assistant", "content": "hello"}]}
    conv = parse_record(record, base_dir=BASE)
    assert conv.messages == [msg("system", text("")), msg("user", text(" hi ")), msg("assistant", text("hello"))]
    assert conv.images == [] and conv.videos == []


# --------------------------------------------------------------------------------------------------------------------
# sharegpt (LLaVA) format
# --------------------------------------------------------------------------------------------------------------------


def test_sharegpt_format_with_top_level_system_single_image_and_video_list():
    record = {
        "system": "You see.",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "user", "value": "And <video>?"},
            {"from": "assistant", "value": "Running."},
        ],
        "image": "coco/1.jpg",
        "video": [{"frames": ["v/0.png", "v/1.png"], "fps": 2}],
    }
    conv = parse_record(record, fmt="sharegpt", base_dir=BASE)
    assert conv == Conversation(
        messages=[
            msg("system", text("You see.")),
            msg("user", IMAGE, text("\nWhat is it?")),
            msg("assistant", text("A cat.")),
            msg("user", text("And "), VIDEO, text("?")),
            msg("assistant", text("Running.")),
        ],
        images=[MediaRef("image", path="/data/set/coco/1.jpg")],
        videos=[MediaRef("video", frames=["/data/set/v/0.png", "/data/set/v/1.png"], fps=2.0)],
    )
    assert detect_format(record) == "sharegpt"
    # The plural keys are accepted too.
    plural = dict(record, images=["coco/1.jpg"], videos=record["video"])
    del plural["image"], plural["video"]
    assert parse_record(plural, base_dir=BASE) == conv


def test_sharegpt_errors():
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    assert skip_reason({"conversations": turns + [{"from": "bot", "value": "x"}]}).reason == "bad_record"
    assert "'bot'" in skip_reason({"conversations": turns + [{"from": "bot", "value": "x"}]}).detail
    assert skip_reason({"conversations": turns, "image": "a.jpg", "images": ["a.jpg"]}).reason == "bad_record"
    assert skip_reason({"conversations": [{"from": "human", "value": 3}, turns[1]]}).reason == "bad_record"
    assert skip_reason({"conversations": []}).reason == "bad_record"


# --------------------------------------------------------------------------------------------------------------------
# openai content lists
# --------------------------------------------------------------------------------------------------------------------


def test_openai_format_parts_and_qwen_style_parts():
    record = {
        "messages": [
            {"role": "system", "content": "sys <image> stays text"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look: "},
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG_B64}"}},
                    {"type": "image", "image": "rel/q.jpg"},
                    {"type": "text", "text": "and "},
                    {"type": "text", "text": "this "},
                    {"type": "video", "video": ["a.jpg", "b.jpg"], "fps": 6},
                    {"type": "video_url", "video_url": {"url": "/abs/v.mp4"}},
                    {"type": "image_url", "image_url": "file:///abs/f.png"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Nice."}]},
        ],
        "fps": 9,
    }
    assert detect_format(record) == "openai"
    conv = parse_record(record, base_dir=BASE)
    assert conv == Conversation(
        messages=[
            msg("system", text("sys <image> stays text")),
            msg("user", text("Look: "), IMAGE, IMAGE, text("and this "), VIDEO, VIDEO, IMAGE),
            msg("assistant", text("Nice.")),
        ],
        images=[MediaRef("image", data=PNG), MediaRef("image", path="/data/set/rel/q.jpg"),
                MediaRef("image", path="/abs/f.png")],
        videos=[MediaRef("video", frames=["/data/set/a.jpg", "/data/set/b.jpg"], fps=6.0),
                MediaRef("video", path="/abs/v.mp4")],
    )
    assert parse_record(record, fmt="openai", base_dir=BASE) == conv
    # A messages-format parse of a list content is refused with the fix.
    err = skip_reason(record, fmt="messages")
    assert err.reason == "bad_record" and "openai" in err.detail


def test_openai_parts_without_source_take_the_top_level_media_in_order():
    # As HF datasets store them (parquet struct columns fill absent fields with None).
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": None, "text": None}, {"type": "text", "text": "?"},
                                         {"type": "image", "image": None, "text": None}]},
            {"role": "assistant", "content": [{"type": "text", "text": "two", "image": None}]},
        ],
        "images": [{"bytes": PNG, "path": "ignored.png"}, {"bytes": None, "path": "p.png"}],
    }
    conv = parse_record(record, base_dir=BASE)
    assert conv.messages[0] == msg("user", IMAGE, text("?"), IMAGE)
    assert conv.images == [MediaRef("image", data=PNG), MediaRef("image", path="/data/set/p.png")]
    assert skip_reason(dict(record, images=record["images"][:1])).reason == "media_mismatch"


def test_auto_detection_is_per_record():
    plain = {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
             "images": ["a.jpg"]}
    listy = {"messages": [plain["messages"][0], {"role": "assistant", "content": [text("x")]}], "images": ["a.jpg"]}
    assert detect_format(plain) == "messages" and detect_format(listy) == "openai"
    assert parse_record(plain, base_dir=BASE).messages[0] == msg("user", IMAGE)
    # In an openai record a string content is plain text, so the top-level image has no place.
    assert skip_reason(listy).reason == "media_mismatch"


# --------------------------------------------------------------------------------------------------------------------
# Record errors
# --------------------------------------------------------------------------------------------------------------------


def test_mismatched_tag_counts():
    base = {"messages": [{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "x"}]}
    err = skip_reason(dict(base, images=["a.jpg"]))
    assert err.reason == "media_mismatch" and "2 <image> tags" in err.detail and "1 images" in err.detail
    assert skip_reason(dict(base, images=["a.jpg", "b.jpg", "c.jpg"])).reason == "media_mismatch"
    no_tags = {"messages": base["messages"][1:], "videos": ["v.mp4"]}
    no_tags["messages"] = [{"role": "user", "content": "hi"}] + no_tags["messages"]
    assert skip_reason(no_tags).reason == "media_mismatch"


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([{"role": "tool", "content": "hi"}, {"role": "assistant", "content": "x"}], "'tool'"),
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}], "got int"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}], "empty content"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "empty content"),
        (["hi", {"role": "assistant", "content": "x"}], "message 0 is a str"),
        ([], "non-empty list"),
    ],
)
def test_unusable_records_are_bad_record(messages, needle):
    images = ["a.jpg", "b.jpg"][: sum(str(m).count("<image>") for m in messages)]
    err = skip_reason({"messages": messages, "images": images})
    assert err.reason == "bad_record" and needle in err.detail, err


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}],
    [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "<image>"}],
])
def test_no_assistant_text_is_no_labels(messages):
    images = ["a.jpg", "b.jpg"][: sum(str(m).count("<image>") for m in messages)]
    err = skip_reason({"messages": messages, "images": images})
    assert err.reason == "no_labels" and "no assistant turn" in err.detail, err


def test_other_record_errors():
    ok = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]
    assert skip_reason({"text": "hi"}).reason == "bad_record"
    with pytest.raises(SkipSample, match="bad_record"):
        parse_record(["not", "a", "dict"], base_dir=BASE)  # type: ignore[arg-type]
    url = skip_reason({"messages": ok, "images": ["https://x.org/a.jpg"]})
    assert url.reason == "missing_media" and "URLs are not downloaded" in url.detail
    assert skip_reason({"messages": ok, "images": ["s3://bucket/a.jpg"]}).reason == "missing_media"
    assert skip_reason({"messages": ok, "images": [{"bytes": b""}]}).reason == "missing_media"
    assert skip_reason({"messages": ok, "images": [None]}).reason == "missing_media"
    assert skip_reason({"messages": ok, "images": ["data:image/png,notbase64"]}).reason == "bad_record"
    assert skip_reason({"messages": ok, "images": [{"bytes": "!!not base64!!"}]}).reason == "bad_record"
    assert skip_reason({"messages": ok, "images": [{"url": "a.jpg"}]}).reason == "bad_record"
    vid = [{"role": "user", "content": "<video>"}, {"role": "assistant", "content": "x"}]
    assert skip_reason({"messages": vid, "videos": [[]]}).reason == "bad_record"
    assert skip_reason({"messages": vid, "videos": [["a.jpg"]], "fps": 0}).reason == "bad_record"
    assert skip_reason({"messages": [msg("user", {"type": "audio"}), msg("assistant", text("x"))]}).reason == (
        "bad_record")
    with pytest.raises(DataError, match="unknown data format"):
        parse_record({"messages": ok}, fmt="alpaca", base_dir=BASE)
    assert FORMATS == ("auto", "messages", "sharegpt", "openai")


# --------------------------------------------------------------------------------------------------------------------
# JSON Lines source
# --------------------------------------------------------------------------------------------------------------------


def _conv(answer):
    return {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": answer}],
            "images": ["img/a.jpg"]}


def _write_jsonl(tmp_path):
    lines = [
        json.dumps(_conv("one")),  # line 1
        "",  # 2: blank
        "   ",  # 3: whitespace only
        json.dumps(_conv("two")),  # 4
        '{"messages": [oops',  # 5: malformed
        "[1, 2]",  # 6: not an object
        json.dumps(_conv("three é")),  # 7
        "",  # 8
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\r\n".join(lines[:3]) + "\r\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")
    return path


def test_jsonl_offsets_line_numbers_and_bad_lines(tmp_path):
    path = _write_jsonl(tmp_path)
    src = open_source(str(path))
    assert isinstance(src, JsonlSource) and len(src) == 5
    assert [src.location(i) for i in range(5)] == [f"{path}:{n}" for n in (1, 4, 5, 6, 7)]
    assert src.base_dir == str(tmp_path)
    for i, answer in ((0, "one"), (1, "two"), (4, "three é")):
        conv = parse_record(src.record(i), base_dir=src.base_dir)
        assert conv.messages[1] == msg("assistant", text(answer))
        assert conv.images == [MediaRef("image", path=str(tmp_path / "img" / "a.jpg"))]
    for i, needle in ((2, "invalid JSON"), (3, "JSON list, not an object")):
        with pytest.raises(SkipSample) as info:
            src.record(i)
        assert info.value.reason == "bad_json" and needle in info.value.detail
        assert info.value.location == f"{path}:{(5, 6)[i - 2]}"
    assert src.record(1) == _conv("two")  # a bad line does not disturb reading its neighbours afterwards
    with pytest.raises(IndexError):
        src.record(5)


def test_jsonl_bom_invalid_utf8_and_json_array(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_conv("a")).encode() + b"\n\xff\xfe\n")
    src = open_source(str(path))
    assert src.record(0) == _conv("a")
    with pytest.raises(SkipSample, match="bad_json") as info:
        src.record(1)
    assert info.value.location == f"{path}:2"
    array = tmp_path / "array.json"
    array.write_text(json.dumps([_conv("a"), _conv("b")], indent=2))
    with pytest.raises(DataError, match="JSON array"):
        open_source(str(array))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert len(open_source(str(empty))) == 0


# --------------------------------------------------------------------------------------------------------------------
# Parquet source
# --------------------------------------------------------------------------------------------------------------------


def _write_parquet(path, n=5):
    """Rows of messages-format records as JSON strings, with HF-datasets style embedded images (row group size 2)."""
    messages = [json.dumps([{"role": "user", "content": "<image>" * (i % 2 + 1) + f"q{i}"},
                            {"role": "assistant", "content": f"a{i}"}]) for i in range(n)]
    images = [[{"bytes": PNG + bytes([i]), "path": None}] + ([{"bytes": None, "path": f"p{i}.png"}] if i % 2 else [])
              for i in range(n)]
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"messages": pa.array(messages, pa.string()), "images": pa.array(images, image_type),
                      "id": pa.array(range(n), pa.int64())})
    pq.write_table(table, path, row_group_size=2)


def test_parquet_rows_with_embedded_image_bytes(tmp_path):
    path = tmp_path / "d.parquet"
    _write_parquet(path)
    src = open_source(str(path))
    assert isinstance(src, ParquetSource) and len(src) == 5
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    assert src.base_dir == str(tmp_path) and src.location(3) == f"{path}:row 3"
    for i in (4, 0, 3, 1, 2):  # out of order: crosses row groups both ways
        row = src.record(i)
        assert row["id"] == i
        conv = parse_record(row, base_dir=src.base_dir)
        expected_images = [MediaRef("image", data=PNG + bytes([i]))]
        if i % 2:
            expected_images.append(MediaRef("image", path=str(tmp_path / f"p{i}.png")))
        assert conv == Conversation(
            messages=[msg("user", *[IMAGE] * (i % 2 + 1), text(f"q{i}")), msg("assistant", text(f"a{i}"))],
            images=expected_images,
        )


def test_parquet_openai_structs_single_image_column_and_bad_json(tmp_path):
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    rows = [
        [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "what?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "a fox"}]}],
    ]
    table = pa.table({"messages": pa.array(rows, pa.list_(message)), "image": pa.array([PNG], pa.binary())})
    pq.write_table(table, tmp_path / "s.parquet")
    conv = parse_record(ParquetSource(str(tmp_path / "s.parquet")).record(0), base_dir=str(tmp_path))
    assert conv == Conversation([msg("user", IMAGE, text("what?")), msg("assistant", text("a fox"))],
                                images=[MediaRef("image", data=PNG)])

    pq.write_table(pa.table({"conversations": ["[not json", json.dumps([{"from": "gpt", "value": "x"}])]}),
                   tmp_path / "bad.parquet")
    src = ParquetSource(str(tmp_path / "bad.parquet"))
    with pytest.raises(SkipSample) as info:
        src.record(0)
    assert info.value.reason == "bad_json" and info.value.location == f"{tmp_path / 'bad.parquet'}:row 0"
    assert src.record(1)["conversations"] == [{"from": "gpt", "value": "x"}]


# --------------------------------------------------------------------------------------------------------------------
# Pickling for DataLoader workers, open_source errors
# --------------------------------------------------------------------------------------------------------------------


def _read_all(src):
    out = []
    for i in range(len(src)):
        try:
            out.append(src.record(i))
        except SkipSample as e:
            out.append([e.reason, e.location])  # a list: DataLoader turns tuples into lists
    return os.getpid(), out


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_sources_pickle_without_handles_and_read_in_another_process(tmp_path):
    _write_parquet(tmp_path / "d.parquet")
    for src in (open_source(str(_write_jsonl(tmp_path))), open_source(str(tmp_path / "d.parquet"))):
        _, expected = _read_all(src)  # the parent has its file open and a row group cached
        blob = pickle.dumps(src)
        assert len(blob) < 2000 and b"fake image bytes" not in blob  # no cached data travels
        assert _read_all(pickle.loads(blob))[1] == expected
        # A fork-started worker, as DataLoader uses on Linux: the source arrives pickled, reads with its own handle.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            pid, got = pool.submit(_read_all, src).result(timeout=60)
        assert pid != os.getpid() and got == expected
        assert _read_all(src)[1] == expected  # the parent's handle is untouched


class _Records(torch.utils.data.Dataset):
    """What a DataLoader worker sees: the source inherited by fork, not pickled."""

    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        pid, (record,) = os.getpid(), _read_all(_Slice(self.src, i))[1]
        own = (self.src._fd_pid if isinstance(self.src, JsonlSource) else self.src._file_pid) == pid
        return pid, own, record


class _Slice:
    def __init__(self, src, i):
        self.src, self.i = src, i

    def __len__(self):
        return 1

    def record(self, _):
        return self.src.record(self.i)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_sources_in_fork_dataloader_workers_open_their_own_handle(tmp_path):
    _write_parquet(tmp_path / "d.parquet")
    for src in (open_source(str(_write_jsonl(tmp_path))), open_source(str(tmp_path / "d.parquet"))):
        _, expected = _read_all(src)
        loader = torch.utils.data.DataLoader(_Records(src), batch_size=None, num_workers=2,
                                             multiprocessing_context="fork")
        got = list(loader)
        assert all(pid != os.getpid() and own for pid, own, _ in got)
        assert [record for _, _, record in got] == expected
        assert _read_all(src)[1] == expected


def test_open_source_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*missing.jsonl"):
        open_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        open_source(str(tmp_path))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported extension '\.csv'.*\.jsonl, \.json, \.parquet"):
        open_source(str(tmp_path / "d.csv"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot open parquet file"):
        open_source(str(tmp_path / "broken.parquet"))
    assert issubclass(DataError, ValueError)
