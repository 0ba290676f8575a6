"""Pure pieces of the converters: shard planning, size parsing, splitting work among processes, header reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from qwenvl_mcore.conversion import hf_io
from qwenvl_mcore.conversion.convert import _split


def test_parse_size():
    assert hf_io.parse_size("5GB") == 5 * 10**9
    assert hf_io.parse_size("200KB") == 200_000
    assert hf_io.parse_size("1.5MB") == 1_500_000
    assert hf_io.parse_size(123) == 123 and hf_io.parse_size("42") == 42
    with pytest.raises(ValueError, match="5GB"):
        hf_io.parse_size("five gigs")


def test_plan_shards_keeps_order_and_limit():
    sizes = [("a", 4), ("b", 4), ("c", 3), ("d", 10), ("e", 1)]
    assert hf_io.plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d"], ["e"]]  # an oversized tensor sits alone
    assert hf_io.plan_shards(sizes, 100) == [["a", "b", "c", "d", "e"]]
    assert hf_io.shard_file_name(0, 1) == "model.safetensors"
    assert hf_io.shard_file_name(1, 12) == "model-00002-of-00012.safetensors"


def test_split_balances_and_covers_everything():
    items = list("abcdefg")
    sizes = [7, 1, 6, 2, 5, 3, 4]
    bins = _split(items, sizes, 2)
    assert sorted(x for b in bins for x in b) == items
    loads = [sum(sizes[items.index(x)] for x in b) for b in bins]
    assert abs(loads[0] - loads[1]) <= 1


def test_reader_reads_exact_bytes_at_header_offsets(tmp_path):
    tensors = {"x": torch.randn(3, 5), "y": torch.randn(7).to(torch.bfloat16), "z": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = hf_io.SafetensorsReader(tmp_path)
    assert reader.names() == ["x", "y", "z"]
    for k, v in tensors.items():
        got = reader.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v)
