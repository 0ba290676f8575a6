"""Dataset files mixed by weight into one indexable SFT dataset of rendered samples.

`data.train` names one or more files (JSONL in the messages / ShareGPT / OpenAI formats, or parquet). Each file
contributes ``weight x its records`` entries per epoch: weight 1 takes every record once, 2 twice, 0.5 a fixed
random half (chosen once from the seed, the same half every epoch), so the mix is exact and needs no epoch-size knob.
Entry ``i`` is parsed and rendered on demand; a bad entry comes back as a :class:`SkipSample` (or raises in strict
mode), so nothing in the data stops a run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.sample import Sample, SkipSample

__all__ = ["DatasetSpec", "MixedDataset", "dataset_specs"]


@dataclass(frozen=True)
class DatasetSpec:
    """One file of a mix: its path, weight (copies per epoch, fractional allowed), record format and media root."""

    path: str
    weight: float = 1.0
    format: str = "auto"  # auto | messages | sharegpt | openai
    media_dir: str | None = None  # relative media paths resolve here (default: the file's directory)


_SPEC_KEYS = {"path", "weight", "format", "media_dir"}


def dataset_specs(value: Any, key: str = "data.train") -> list[DatasetSpec]:
    """The specs of a `data.train`/`data.valid` value: a path, or a list of paths and ``{path, weight, format,
    media_dir}`` mappings. A bad value raises :class:`DataError` naming ``key`` and the accepted forms."""
    if value is None:
        return []
    if isinstance(value, (str, Mapping)):
        items = [value]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise DataError(f"{key}={value!r} is not a dataset: give a path, or a list of paths and {{path, weight, "
                        "format, media_dir}} mappings.")
    specs = []
    for item in items:
        if isinstance(item, str):
            specs.append(DatasetSpec(item))
            continue
        if not isinstance(item, Mapping) or "path" not in item or set(item) - _SPEC_KEYS:
            raise DataError(f"{key}: {item!r} is not a dataset; give a path or a mapping with keys path (required), "
                            "weight, format, media_dir, e.g. data.train=[{path:a.jsonl,weight:2},b.parquet].")
        try:
            weight = float(item.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = math.nan
        spec = DatasetSpec(str(item["path"]), weight, str(item.get("format", "auto")),
                           None if item.get("media_dir") is None else str(item["media_dir"]))
        if not (spec.weight > 0 and math.isfinite(spec.weight)):
            raise DataError(f"{key}: weight {item.get('weight')!r} of {spec.path} must be a positive number.")
        specs.append(spec)
    if not specs:
        raise DataError(f"{key} is an empty list: give at least one dataset file.")
    return specs


def _entries(num_records: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Record indices one file contributes per epoch: floor(weight) full copies plus a random subset for the rest."""
    whole, fraction = divmod(weight, 1.0)
    parts = [np.tile(np.arange(num_records, dtype=np.int64), int(whole))]
    extra = int(round(fraction * num_records))
    if extra:
        parts.append(np.sort(rng.permutation(num_records)[:extra]))
    return np.concatenate(parts)


class MixedDataset:
    """The files of ``specs`` mixed by weight; ``dataset[i]`` is a rendered :class:`Sample` or a :class:`SkipSample`.

    ``renderer`` turns a parsed conversation into a Sample (``render(conv, index=, location=)``, see render.py).
    Entries are ordered file by file (the sampler shuffles them). In ``strict`` mode a bad entry raises
    :class:`DataError` (with its reason and location) instead of being returned as a skip.
    """

    def __init__(self, specs: Sequence[DatasetSpec], renderer, *, seed: int = 0, strict: bool = False,
                 frames_fps: float = 2.0):
        from qwenvl_mcore.data.formats import FORMATS
        from qwenvl_mcore.data.sources import open_source

        if not specs:
            raise DataError("no dataset files given: set data.train=<file.jsonl or file.parquet>.")
        self.specs = list(specs)
        for spec in self.specs:
            if spec.format not in FORMATS:
                raise DataError(f"format {spec.format!r} of {spec.path}: choose one of {', '.join(FORMATS)}.")
            if spec.media_dir is not None and not os.path.isdir(spec.media_dir):
                raise DataError(f"media_dir {spec.media_dir} of {spec.path} is not a directory.")
        self.sources = [open_source(spec.path) for spec in self.specs]
        self.renderer, self.strict, self.frames_fps = renderer, strict, frames_fps
        rng = np.random.default_rng([seed, 0x6D6978])  # the fractional subsets; independent of the epoch shuffles
        tables = [_entries(len(src), spec.weight, rng) for src, spec in zip(self.sources, self.specs)]
        self.file_of = np.concatenate([np.full(len(t), k, dtype=np.int32) for k, t in enumerate(tables)])
        self.record_of = np.concatenate(tables)
        if len(self.record_of) == 0:
            raise DataError(f"the datasets {[s.path for s in self.specs]} hold no records.")

    def __len__(self) -> int:
        return int(len(self.record_of))

    def counts(self) -> dict[str, int]:
        """Entries per epoch of each file (its records x weight)."""
        return {spec.path: int((self.file_of == k).sum()) for k, spec in enumerate(self.specs)}

    def location(self, index: int) -> str:
        k, r = int(self.file_of[index]), int(self.record_of[index])
        return self.sources[k].location(r)

    def conversation(self, index: int):
        """Entry ``index`` parsed (not rendered); raises :class:`SkipSample` for a bad record."""
        from qwenvl_mcore.data.formats import parse_record

        k, r = int(self.file_of[index]), int(self.record_of[index])
        source, spec = self.sources[k], self.specs[k]
        try:
            return parse_record(source.record(r), fmt=spec.format, base_dir=source.base_dir,
                                media_dir=spec.media_dir, frames_fps=self.frames_fps)
        except SkipSample as skip:
            raise skip.at(source.location(r))

    def __getitem__(self, index: int) -> Sample | SkipSample:
        if not 0 <= index < len(self):
            raise IndexError(f"entry {index} out of range for a mix of {len(self)} entries.")
        try:
            conversation = self.conversation(index)
            return self.renderer.render(conversation, index=int(index), location=self.location(index))
        except SkipSample as skip:
            skip.at(self.location(index))
            if self.strict:
                raise DataError(f"data.strict=true: {skip} (set data.strict=false to skip bad samples)") from None
            return skip
        except Exception as e:  # not the data's fault (a bug): raised as is, saying which sample it was rendering
            e.add_note(f"while reading entry {index} at {self.location(index)}")
            raise
