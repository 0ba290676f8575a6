"""The one in-memory form every input format is parsed into, before rendering: :class:`Conversation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Conversation", "MediaRef"]


@dataclass
class MediaRef:
    """Where one image or video comes from. Exactly one of ``path``, ``data`` or ``frames`` is set.

    ``path``: a file (absolute, resolved against the dataset's media directory by the parser). ``data``: the
    encoded file bytes (parquet, data URLs). ``frames``: a video given as a list of image files (absolute), shown at
    ``fps`` frames per second (required for ``frames``; ignored otherwise, a video file carries its own rate).
    """

    kind: str  # "image" | "video"
    path: str | None = None
    data: bytes | None = None
    frames: list[str] | None = None
    fps: float | None = None

    def describe(self) -> str:
        """A short human description for logs: the path, 'N frame files from <first>', or 'N embedded bytes'."""
        if self.path is not None:
            return self.path
        if self.frames is not None:
            return f"{len(self.frames)} frame files from {self.frames[0] if self.frames else '?'}"
        return f"{len(self.data or b'')} embedded bytes"


@dataclass
class Conversation:
    """A chat in the chat template's terms, with its media in order of appearance.

    ``messages``: ``{"role": "system" | "user" | "assistant", "content": [part, ...]}`` where a part is
    ``{"type": "text", "text": str}``, ``{"type": "image"}`` or ``{"type": "video"}``; the i-th image part is
    ``images[i]`` and the i-th video part ``videos[i]`` (counted over the whole conversation).
    """

    messages: list[dict[str, Any]]
    images: list[MediaRef] = field(default_factory=list)
    videos: list[MediaRef] = field(default_factory=list)
