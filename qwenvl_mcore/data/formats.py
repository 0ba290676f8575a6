"""Parsing of dataset records, in every supported format, into one :class:`~.conversation.Conversation`.

Formats (``fmt``; ``"auto"`` picks one per record, see :func:`detect_format`):

* ``messages`` (ms-swift): ``{"messages": [{"role", "content": str}], "images": [...], "videos": [...]}``, the media
  placed by ``<image>`` / ``<video>`` tags in the text, in order.
* ``sharegpt`` (LLaVA): ``{"conversations": [{"from", "value": str}], "image": ..., "video": ..., "system": str}``,
  tags as above.
* ``openai``: ``{"messages": [{"role", "content": str | [part, ...]}]}`` with ``text``, ``image_url``, ``video_url``
  parts and the Qwen ``image`` / ``video`` parts. A media part without a source (``{"type": "image"}``, as HF datasets
  store them next to an ``images`` column) takes the next item of the record's top-level ``images`` / ``videos``.

Media entries are described, never opened: a missing or undecodable file is the renderer's to report. Text is kept
exactly as given (whitespace and newlines after tags included), so the chat template sees the user's text.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from typing import Any

from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.conversation import Conversation, MediaRef
from qwenvl_mcore.data.sample import SkipSample

__all__ = ["FORMATS", "ROLES", "detect_format", "parse_record"]

FORMATS = ("auto", "messages", "sharegpt", "openai")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

_TAG = re.compile(r"(<image>|<video>)")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # any scheme://, so s3:// etc. do not pass as relative paths
_DATA_URL = re.compile(r"^data:([^,]*?),", re.DOTALL)


@dataclass
class _Slot:
    """A media part before resolution: ``source`` is the inline entry, or None to take the next top-level item."""

    kind: str  # "image" | "video"
    source: Any = None
    fps: Any = None  # a part's own fps (openai video parts)
    label: str = ""


def _bad(detail: str) -> SkipSample:
    return SkipSample("bad_record", detail)


def detect_format(record: dict[str, Any]) -> str:
    """The format of one record: ``conversations`` -> sharegpt; ``messages`` with any list content -> openai;
    ``messages`` with only string contents -> messages. Raises ``SkipSample("bad_record")`` when neither key exists."""
    if "conversations" in record:
        return "sharegpt"
    messages = record.get("messages")
    if messages is None:
        raise _bad(f"record has neither 'messages' nor 'conversations' (keys: {sorted(record)[:10]})")
    if isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages):
        return "openai"
    return "messages"


def parse_record(
    record: dict[str, Any],
    *,
    fmt: str = "auto",
    base_dir: str,
    media_dir: str | None = None,
    frames_fps: float = 2.0,
) -> Conversation:
    """Parse ``record`` (format ``fmt``, one of :data:`FORMATS`) into a :class:`Conversation`.

    Relative media paths resolve against ``media_dir`` if given, else ``base_dir`` (the dataset file's directory);
    absolute paths are kept as given. A video given as frame files plays at its own ``fps``, else the record's
    ``"fps"``, else ``frames_fps``.

    Raises ``SkipSample`` with reason ``bad_record`` (no usable conversation: missing/empty messages, unknown role,
    content of the wrong type, empty non-system content, malformed media entries), ``no_labels`` (no assistant turn
    with text),
    ``media_mismatch`` (tags or source-less media parts differ in number from the media given) or ``missing_media``
    (http(s) or other URLs, empty paths or bytes). Raises :class:`DataError` for an unknown ``fmt`` (a config error).
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {FORMATS}.")
    if not frames_fps > 0:
        raise DataError(f"frames_fps must be > 0, got {frames_fps}.")
    if not isinstance(record, dict):
        raise _bad(f"record is a {type(record).__name__}, not an object")
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt == "sharegpt":
        raw = _sharegpt_messages(record)
    else:
        raw = _chat_messages(record, openai=fmt == "openai")

    messages = []
    for i, (role, parts) in enumerate(raw):
        parts = _merge_text(parts)
        if not parts and role != "system":
            raise _bad(f"message {i} ({role}) has empty content; only a system message may be empty")
        messages.append((role, parts or [""]))
    if not any(role == "assistant" and any(isinstance(p, str) and p.strip() for p in ps) for role, ps in messages):
        raise SkipSample("no_labels", "no assistant turn with text: nothing to train on")

    slots = [p for _, parts in messages for p in parts if isinstance(p, _Slot)]
    root = os.path.abspath(media_dir) if media_dir else os.path.abspath(base_dir)
    images = _resolve(record, slots, "image", root, frames_fps)
    videos = _resolve(record, slots, "video", root, frames_fps)
    return Conversation(
        messages=[
            {
                "role": role,
                "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": p.kind} for p in parts],
            }
            for role, parts in messages
        ],
        images=images,
        videos=videos,
    )


# --------------------------------------------------------------------------------------------------------------------
# Messages of each format, as (role, [str | _Slot, ...])
# --------------------------------------------------------------------------------------------------------------------


def _split_tags(text: str) -> list[str | _Slot]:
    """``text`` with each ``<image>`` / ``<video>`` tag replaced, in place, by a slot for the next top-level item."""
    return [_Slot(piece[1:-1]) if piece in ("<image>", "<video>") else piece for piece in _TAG.split(text) if piece]


def _sharegpt_messages(record: dict[str, Any]) -> list[tuple[str, list]]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _bad("'conversations' must be a non-empty list of {'from', 'value'} turns")
    out: list[tuple[str, list]] = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise _bad(f"top-level 'system' must be a string, got {type(system).__name__}")
        out.append(("system", _split_tags(system)))
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _bad(f"conversation turn {i} is a {type(turn).__name__}, not an object with 'from' and 'value'")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise _bad(f"unknown role {speaker!r} in conversation turn {i}; expected one of {sorted(SHAREGPT_ROLES)}")
        value = turn.get("value")
        if value is not None and not isinstance(value, str):
            raise _bad(f"'value' of conversation turn {i} must be a string, got {type(value).__name__}")
        out.append((SHAREGPT_ROLES[speaker], _split_tags(value or "")))
    return out


def _chat_messages(record: dict[str, Any], *, openai: bool) -> list[tuple[str, list]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {'role', 'content'} messages")
    out: list[tuple[str, list]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"message {i} is a {type(message).__name__}, not an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"unknown role {role!r} in message {i}; expected one of {ROLES}")
        content = message.get("content")
        if content is None:
            parts: list = []
        elif isinstance(content, str):
            # openai string contents are plain text: tags are not media there (the record would be 'messages' else).
            parts = [content] if openai else _split_tags(content)
        elif isinstance(content, list) and openai:
            parts = [_openai_part(part, f"message {i} part {j}") for j, part in enumerate(content)]
        else:
            expected = "a string or a list of parts" if openai else "a string (list contents are the 'openai' format)"
            raise _bad(f"content of message {i} must be {expected}, got {type(content).__name__}")
        out.append((role, parts))
    return out


def _openai_part(part: Any, label: str) -> str | _Slot:
    if not isinstance(part, dict):
        raise _bad(f"{label} is a {type(part).__name__}, not an object with a 'type'")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{label}: 'text' must be a string, got {type(text).__name__}")
        return text
    if kind in ("image_url", "video_url"):
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        if url is None:
            raise _bad(f"{label}: {kind} part without a url; give {{'type': {kind!r}, {kind!r}: {{'url': ...}}}}")
        return _Slot(kind[:5], url, label=label)
    if kind in ("image", "video"):
        # No source: the part stands for the next item of the top-level list (HF datasets keep media in a column).
        return _Slot(kind, part.get(kind), fps=part.get("fps"), label=label)
    raise _bad(f"{label} has unknown type {kind!r}; expected text, image_url, video_url, image or video")


def _merge_text(parts: list[str | _Slot]) -> list[str | _Slot]:
    """Drop empty text pieces and join adjacent ones."""
    out: list[str | _Slot] = []
    for p in parts:
        if isinstance(p, str):
            if not p:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += p
                continue
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Media
# --------------------------------------------------------------------------------------------------------------------


def _top_level(record: dict[str, Any], kind: str) -> list[Any]:
    """The record's top-level media list for ``kind``, from ``images`` or ``image`` (``videos`` / ``video``)."""
    plural, singular = kind + "s", kind
    values = [record.get(k) for k in (plural, singular) if record.get(k) is not None]
    if len(values) > 1:
        raise _bad(f"record has both {plural!r} and {singular!r}; give the media in one of them")
    if not values:
        return []
    return values[0] if isinstance(values[0], list) else [values[0]]


def _resolve(record: dict[str, Any], slots: list[_Slot], kind: str, root: str, frames_fps: float) -> list[MediaRef]:
    slots = [s for s in slots if s.kind == kind]
    given = _top_level(record, kind)
    wanted = sum(s.source is None for s in slots)
    if wanted != len(given):
        raise SkipSample("media_mismatch", f"{wanted} <{kind}> tags (or {kind} parts without a source) but "
                                           f"{len(given)} {kind}s given in the record")
    record_fps = record.get("fps")
    refs, top = [], iter(enumerate(given))
    for slot in slots:
        if slot.source is None:
            index, entry = next(top)
            label = f"{kind}s[{index}]"
        else:
            entry, label = slot.source, slot.label
        if kind == "image":
            refs.append(_image_ref(entry, label, root))
        else:
            fps = next((f for f in (slot.fps, record_fps) if f is not None), frames_fps)
            refs.append(_video_ref(entry, label, root, fps))
    return refs


def _image_ref(entry: Any, label: str, root: str) -> MediaRef:
    if isinstance(entry, dict):
        if entry.get("bytes") is not None:
            return MediaRef("image", data=_bytes(entry["bytes"], label))
        if entry.get("path") is not None:
            return _from_string("image", entry["path"], label, root)
        raise _bad(f"{label}: an image object needs 'path' or 'bytes' (got keys {sorted(entry)})")
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return MediaRef("image", data=_bytes(entry, label))
    if isinstance(entry, str):
        return _from_string("image", entry, label, root)
    if entry is None:
        raise SkipSample("missing_media", f"{label} is null")
    raise _bad(f"{label} must be a path, a data URL, {{'path': ...}} or {{'bytes': ...}}, got {type(entry).__name__}")


def _video_ref(entry: Any, label: str, root: str, fps: Any) -> MediaRef:
    if isinstance(entry, dict):
        if entry.get("frames") is not None:
            return _frames(entry["frames"], label, root, entry["fps"] if entry.get("fps") is not None else fps)
        if entry.get("bytes") is not None:
            return MediaRef("video", data=_bytes(entry["bytes"], label))
        if entry.get("path") is not None:
            return _from_string("video", entry["path"], label, root)
        raise _bad(f"{label}: a video object needs 'path', 'frames' or 'bytes' (got keys {sorted(entry)})")
    if isinstance(entry, list):
        return _frames(entry, label, root, fps)
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return MediaRef("video", data=_bytes(entry, label))
    if isinstance(entry, str):
        return _from_string("video", entry, label, root)
    if entry is None:
        raise SkipSample("missing_media", f"{label} is null")
    raise _bad(f"{label} must be a path, a list of frame paths, {{'path': ...}} or {{'frames': [...], 'fps': x}}, "
               f"got {type(entry).__name__}")


def _frames(frames: Any, label: str, root: str, fps: Any) -> MediaRef:
    if not isinstance(frames, list) or not frames:
        raise _bad(f"{label}: a video given as frames needs a non-empty list of frame image paths")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise _bad(f"{label}: fps of a video given as frames must be a number > 0, got {fps!r}")
    paths = []
    for j, frame in enumerate(frames):
        if not isinstance(frame, str):
            raise _bad(f"{label}: frame {j} must be an image path, got {type(frame).__name__}")
        paths.append(_path(frame, f"{label} frame {j}", root))
    return MediaRef("video", frames=paths, fps=float(fps))


def _from_string(kind: str, value: Any, label: str, root: str) -> MediaRef:
    """A path, ``file://`` URL or ``data:`` URL; other URLs are refused (nothing is downloaded)."""
    if not isinstance(value, str):
        raise _bad(f"{label}: path must be a string, got {type(value).__name__}")
    if value.startswith("data:"):
        return MediaRef(kind, data=_data_url(value, label))
    return MediaRef(kind, path=_path(value, label, root))


def _path(value: str, label: str, root: str) -> str:
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif _URL.match(value):
        raise SkipSample("missing_media", f"{label} is a URL ({value[:80]}); URLs are not downloaded; download the "
                                          f"media and give a path")
    if not value:
        raise SkipSample("missing_media", f"{label} is an empty path")
    return value if os.path.isabs(value) else os.path.join(root, value)


def _data_url(url: str, label: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None or not match.group(1).endswith(";base64"):
        raise _bad(f"{label}: only base64 data URLs are supported (data:<type>;base64,<data>)")
    return _b64(url[match.end():], label)


def _bytes(value: Any, label: str) -> bytes:
    """Embedded bytes: raw, or a base64 string (or data URL), as JSON cannot hold raw bytes."""
    if isinstance(value, str):
        data = _data_url(value, label) if value.startswith("data:") else _b64(value, label)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise _bad(f"{label}: 'bytes' must be bytes or a base64 string, got {type(value).__name__}")
    if not data:
        raise SkipSample("missing_media", f"{label} has empty bytes")
    return data


def _b64(text: str, label: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)  # line breaks are common in encoded blobs
    except (binascii.Error, ValueError) as e:
        raise _bad(f"{label}: embedded data is not valid base64 ({e})")
    if not data:
        raise SkipSample("missing_media", f"{label} has empty bytes")
    return data
