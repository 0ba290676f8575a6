"""A sample the processor refuses is a counted skip, not a stopped run (issue 16, item 2): an image with an aspect
ratio above 200 makes transformers' Qwen3-VL processor raise ValueError; the dataset returns a ``processor_error``
skip naming the file, the line, the image and the original message; in strict mode it is a DataError naming them;
tools/data/inspect.py --summary counts it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.mixing import DatasetSpec, MixedDataset
from qwenvl_mcore.data.render import Renderer
from qwenvl_mcore.data.sample import SKIP_REASONS, Sample, SkipSample
from qwenvl_mcore.testing import tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wide")
    Image.new("RGB", (900, 4), (200, 10, 10)).save(root / "wide.png")  # aspect ratio 225
    Image.new("RGB", (64, 48), (0, 120, 0)).save(root / "ok.png")
    records = [{"messages": [{"role": "user", "content": "<image>What is it?"},
                             {"role": "assistant", "content": "A red line."}], "images": ["wide.png"]},
               {"messages": [{"role": "user", "content": "<image>And this?"},
                             {"role": "assistant", "content": "Green."}], "images": ["ok.png"]}]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def renderer():
    return Renderer(tiny.build_processor(tiny.build_tokenizer()))


def test_an_extreme_aspect_ratio_is_a_counted_skip(data, renderer):
    assert "processor_error" in SKIP_REASONS
    mix = MixedDataset([DatasetSpec(str(data))], renderer)
    skip = mix[0]
    assert isinstance(skip, SkipSample) and skip.reason == "processor_error"
    assert skip.location == f"{data}:1"
    assert skip.detail.startswith("ValueError: ") and "aspect ratio" in skip.detail  # transformers' own message
    assert "wide.png" in skip.detail
    assert isinstance(mix[1], Sample)  # the next sample is unaffected


def test_strict_mode_names_the_reason_and_location(data, renderer):
    mix = MixedDataset([DatasetSpec(str(data))], renderer, strict=True)
    with pytest.raises(DataError, match=rf"data.strict=true: processor_error at {data}:1: ValueError: .*aspect ratio"):
        mix[0]


def test_inspect_summary_counts_it(data):
    proc = subprocess.run([sys.executable, "tools/data/inspect.py", f"data.train={data}", "--summary"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 of 2 entries rendered: 1 usable, 1 skipped" in proc.stdout
    assert f"skipped processor_error: 1 (first: {data}:1)" in proc.stdout


def test_inspect_strict_is_an_error_line(data):
    proc = subprocess.run([sys.executable, "tools/data/inspect.py", f"data.train={data}", "data.strict=true",
                           "--summary"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: data.strict=true: processor_error at {data}:1" in proc.stderr and "Traceback" not in proc.stderr
