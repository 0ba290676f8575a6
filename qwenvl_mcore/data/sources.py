"""Random access to the records of a dataset file: JSON Lines (:class:`JsonlSource`) or :class:`ParquetSource`.

A source only reads records (``dict`` s); turning them into conversations is :mod:`qwenvl_mcore.data.formats`' job.
Sources are built once in the main process and pickled into DataLoader workers, so they hold no open file handle
when pickled: each process opens the file on first use.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from array import array
from bisect import bisect_right
from typing import Any

from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.sample import SkipSample

__all__ = ["JSON_COLUMNS", "SOURCE_EXTENSIONS", "JsonlSource", "ParquetSource", "RecordSource", "open_source"]

#: File extensions :func:`open_source` understands (``.json`` is read as JSON Lines, one record per line).
SOURCE_EXTENSIONS = (".jsonl", ".json", ".parquet")

#: Parquet columns that may hold their value as a JSON string (decoded by :meth:`ParquetSource.record`).
JSON_COLUMNS = ("messages", "conversations")

_UTF8_BOM = b"\xef\xbb\xbf"


class RecordSource(ABC):
    """A dataset file seen as a sequence of records.

    Contract: ``len(source)`` records; ``record(i)`` returns record ``i`` as a ``dict`` or raises :class:`SkipSample`
    (with its location set) when that record alone is unreadable; ``location(i)`` names where it is in the file, for
    logs; ``base_dir`` is the absolute directory of the file (relative media paths resolve against it); ``path`` is
    the file as given. An index outside ``[0, len)`` raises ``IndexError``.
    """

    path: str
    base_dir: str

    @abstractmethod
    def __len__(self) -> int:
        """See the class contract."""

    @abstractmethod
    def record(self, i: int) -> dict[str, Any]:
        """See the class contract."""

    @abstractmethod
    def location(self, i: int) -> str:
        """See the class contract."""

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for {self.path} ({n} records)")
        return i


def open_source(path: str) -> RecordSource:
    """The source for ``path``, chosen by extension: ``.jsonl`` / ``.json`` (JSON Lines) or ``.parquet``.

    Raises :class:`DataError` for a missing file, a directory or any other extension.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"dataset file not found: {path!r}; check the path (relative paths are resolved against the "
                        f"working directory {os.getcwd()!r}).")
    if os.path.isdir(path):
        raise DataError(f"dataset path {path!r} is a directory; give one file ({', '.join(SOURCE_EXTENSIONS)}) or "
                        f"list each file of the directory separately.")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return JsonlSource(path)
    if ext == ".parquet":
        return ParquetSource(path)
    raise DataError(f"dataset file {path!r} has an unsupported extension {ext or '(none)'!r}; supported are "
                    f"{', '.join(SOURCE_EXTENSIONS)} (.json is read as JSON Lines, one object per line). Convert the "
                    f"file (decompress it, or rewrite it as JSON Lines or parquet) or rename it if it already is one.")


class JsonlSource(RecordSource):
    """A JSON Lines file: record ``i`` is its ``i``-th non-blank line, which must be one JSON object.

    The constructor scans the file once for the byte offsets of its non-blank lines (whitespace-only lines are not
    records). A line that is not valid UTF-8 JSON, or not an object, raises ``SkipSample("bad_json")`` on
    :meth:`record`; the other lines are unaffected. ``location(i)`` is ``"<path>:<line>"`` with the 1-based line
    number in the file (blank lines counted).
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.base_dir = os.path.dirname(os.path.abspath(self.path))
        # array('q') rather than lists: compact in memory and pickled as raw bytes for DataLoader workers.
        self._offsets = array("q")
        self._lengths = array("q")
        self._lines = array("q")
        try:
            self._scan()
        except OSError as e:
            raise DataError(f"cannot read dataset file {self.path!r}: {e}; check that it exists and is readable.")
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def _scan(self) -> None:
        offset, first = 0, b""
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                start, length = offset, len(line)
                offset += length
                if line_no == 1 and line.startswith(_UTF8_BOM):  # editors on Windows write one; json rejects it
                    start, length, line = start + 3, length - 3, line[3:]
                if line.strip():
                    self._offsets.append(start)
                    self._lengths.append(length)
                    self._lines.append(line_no)
                    if len(self._offsets) == 1:
                        first = line.strip()
        # A pretty-printed JSON array would otherwise turn into one bad_json skip per line and an empty dataset.
        if len(self._offsets) and (first == b"[" or (len(self._offsets) == 1 and first.startswith(b"["))):
            raise DataError(f"dataset file {self.path!r} holds a JSON array, not JSON Lines; rewrite it with one JSON "
                            f"object per line (e.g. `jq -c '.[]' in.json > out.jsonl`).")

    def __len__(self) -> int:
        return len(self._offsets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = state["_fd_pid"] = None  # each process opens its own descriptor
        return state

    def __del__(self):  # do not leak a descriptor per discarded source
        self.close()

    def close(self) -> None:
        """Close this process's file descriptor (reopened on the next :meth:`record`)."""
        fd = getattr(self, "_fd", None)
        if fd is not None and self._fd_pid == os.getpid():
            os.close(fd)
        self._fd = self._fd_pid = None

    def _descriptor(self) -> int:
        # A forked worker inherits the parent's descriptor; open its own so that nothing is shared across processes.
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def location(self, i: int) -> str:
        return f"{self.path}:{self._lines[self._check_index(i)]}"

    def record(self, i: int) -> dict[str, Any]:
        self._check_index(i)
        # pread: reads at an offset without moving a shared file position.
        raw = os.pread(self._descriptor(), self._lengths[i], self._offsets[i])
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SkipSample("bad_json", f"line is not valid UTF-8 ({e.reason} at byte {e.start})", self.location(i))
        except json.JSONDecodeError as e:
            raise SkipSample("bad_json", f"invalid JSON: {e.msg} at column {e.colno}", self.location(i))
        if not isinstance(value, dict):
            raise SkipSample("bad_json", f"line is a JSON {type(value).__name__}, not an object", self.location(i))
        return value


class ParquetSource(RecordSource):
    """A parquet file (read with pyarrow): record ``i`` is row ``i`` as a ``dict`` of its columns (Python objects).

    Rows are read one row group at a time and the most recently read row group is kept (per process), so sequential
    reads are cheap and the file is never loaded whole; shuffled reads cost one row group each, so write files with
    small row groups. A ``messages`` / ``conversations`` column holding a JSON string is decoded (invalid JSON raises
    ``SkipSample("bad_json")``). Media embedded HF-datasets style (``images`` / ``image`` columns of
    ``{"bytes", "path"}`` structs or plain binary, or lists of them) come out as dicts / ``bytes`` for the format
    parser. ``location(i)`` is ``"<path>:row <i>"``.
    """

    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = os.fspath(path)
        self.base_dir = os.path.dirname(os.path.abspath(self.path))
        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:  # ArrowInvalid for a file that is not parquet
            raise DataError(f"cannot open parquet file {self.path!r}: {e}; check that it is a complete parquet file.")
        metadata = pf.metadata
        # _starts[k] = first row of row group k; a row's group is found by bisection.
        self._starts = [0]
        for k in range(metadata.num_row_groups):
            self._starts.append(self._starts[-1] + metadata.row_group(k).num_rows)
        self._num_rows = self._starts[-1]
        self._file, self._file_pid = pf, os.getpid()
        self._group: tuple[int, Any] | None = None  # (row group index, pyarrow Table)

    def __len__(self) -> int:
        return self._num_rows

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"] = state["_file_pid"] = state["_group"] = None  # reopened lazily in the receiving process
        return state

    def _parquet_file(self):
        if self._file is None or self._file_pid != os.getpid():
            import pyarrow.parquet as pq

            self._file, self._file_pid, self._group = pq.ParquetFile(self.path), os.getpid(), None
        return self._file

    def location(self, i: int) -> str:
        return f"{self.path}:row {self._check_index(i)}"

    def record(self, i: int) -> dict[str, Any]:
        self._check_index(i)
        k = bisect_right(self._starts, i) - 1
        pf = self._parquet_file()
        if self._group is None or self._group[0] != k:
            self._group = (k, pf.read_row_group(k))
        row = self._group[1].slice(i - self._starts[k], 1).to_pylist()[0]
        for column in JSON_COLUMNS:
            value = row.get(column)
            if isinstance(value, str):
                try:
                    row[column] = json.loads(value)
                except json.JSONDecodeError as e:
                    raise SkipSample("bad_json", f"column {column!r} is not valid JSON: {e.msg} at column {e.colno}",
                                     self.location(i))
        return row
