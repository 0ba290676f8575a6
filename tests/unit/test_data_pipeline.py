"""The file data path end to end: `data.train` specs, files mixed by weight, bad records skipped where the sample
dataset's manifest says, the over-long policies (truncation never splits an image or a video), a step's packed or
padded micro-batches (deterministic, split over data-parallel ranks, the same from DataLoader workers) and
tools/data/inspect.py.

One dirty sample dataset (qwenvl_mcore.data.sample_data) is written per module; its manifest says which records are
bad and why, so the expectations here come from the files, not from the pipeline's own code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.mixing import DatasetSpec, MixedDataset, dataset_specs
from qwenvl_mcore.data.pipeline import (
    BatchShape,
    StepBatches,
    empty_microbatch,
    fit_length,
    step_loader,
)
from qwenvl_mcore.data.render import Renderer
from qwenvl_mcore.data.sample import Sample, SkipSample
from qwenvl_mcore.data.sample_data import write_sample_dataset
from qwenvl_mcore.data.sampler import GlobalBatchSampler
from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX, shift_labels
from qwenvl_mcore.models.qwen3_vl_moe.rope import get_rope_index
from qwenvl_mcore.testing import tiny

ROOT = Path(__file__).resolve().parents[2]
SEQ = 600  # data.seq_length of the dirty dataset = its overlong_tokens: clean samples fit, the over-long ones not
GBS = 8
TIMESTAMP = re.compile(r"<\d+(\.\d+)? seconds>")


# --------------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    return tiny.build_processor(tiny.build_tokenizer())


@pytest.fixture(scope="module")
def renderer(processor):
    return Renderer(processor)


@pytest.fixture(scope="module")
def model_args():
    return args_from_hf_config(flavor_hf_config("debug"))


def make_shape(model_args, processor, *, seq_length=SEQ, packing=True, micro_batch_size=1, overlong="drop"):
    return BatchShape.of(model_args, processor.tokenizer.pad_token_id, seq_length=seq_length, packing=packing,
                         micro_batch_size=micro_batch_size, overlong=overlong)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """(directory, manifest) of a dirty dataset in all four formats, with one over-long record per format."""
    out = tmp_path_factory.mktemp("dirty")
    manifest = write_sample_dataset(out, num_samples=40, seed=3, dirty_fraction=0.35, overlong_tokens=SEQ,
                                    image_sides=(48, 96), video_frames=(8, 16))
    return out, manifest


@pytest.fixture(scope="module")
def mix(dirty, renderer):
    out, manifest = dirty
    return MixedDataset(dataset_specs([str(out / f) for f in manifest["files"]]), renderer, seed=0)


def manifest_location(out: Path, entry: dict) -> str:
    where = f"row {entry['row']}" if "row" in entry else str(entry["line"])
    return f"{out / entry['file']}:{where}"


@pytest.fixture(scope="module")
def late_media(dirty, renderer, tmp_path_factory):
    """Samples whose images and videos come after trained answers (the sample dataset puts media in the first user
    turn only, where a cut through them leaves nothing to train on), rendered from a messages file of our own."""
    out, manifest = dirty
    images = [out / p for p, m in manifest["media"].items() if m["type"] == "image"]
    videos = [out / p for p, m in manifest["media"].items() if m["type"] == "video" and m["frames"] >= 8]
    assert len(images) >= 4 and len(videos) >= 3
    records = [
        {"messages": [{"role": "user", "content": "Hello, how are you today?"},
                      {"role": "assistant", "content": "I am fine, thank you."},
                      {"role": "user", "content": "<image> and <video> What is shown?"},
                      {"role": "assistant", "content": "A red square and a blue circle."},
                      {"role": "user", "content": "Then <video> and <image>: which one moves?"},
                      {"role": "assistant", "content": "The ball moves from the left to the right."}],
         "images": [str(images[0]), str(images[1])], "videos": [str(videos[0]), str(videos[1])]},
        {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "Describe <video> in one short sentence."},
                      {"role": "assistant", "content": "A green ball is moving."},
                      {"role": "user", "content": "Compare <image> <image>."},
                      {"role": "assistant", "content": "The first one is brighter."}],
         "images": [str(images[2]), str(images[3])], "videos": [str(videos[2])]},
    ]
    path = tmp_path_factory.mktemp("late") / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = MixedDataset(dataset_specs(str(path)), renderer)
    samples = [ds[i] for i in range(len(ds))]
    assert all(isinstance(s, Sample) for s in samples), samples
    return samples


@pytest.fixture(scope="module")
def clean_samples(mix):
    """The rendered clean entries of the mix (every one fits in SEQ tokens)."""
    items = [mix[i] for i in range(len(mix))]
    return [s for s in items if isinstance(s, Sample) and len(s) <= SEQ]


# --------------------------------------------------------------------------------------------------------------------
# dataset_specs
# --------------------------------------------------------------------------------------------------------------------


def test_dataset_specs_forms():
    assert dataset_specs(None) == []
    assert dataset_specs("a.jsonl") == [DatasetSpec("a.jsonl", 1.0, "auto", None)]
    assert dataset_specs(["a.jsonl", "b.parquet"]) == [DatasetSpec("a.jsonl"), DatasetSpec("b.parquet")]
    assert dataset_specs({"path": "a.jsonl", "weight": 3}) == [DatasetSpec("a.jsonl", 3.0)]
    specs = dataset_specs([{"path": "a.jsonl", "weight": 2, "format": "sharegpt", "media_dir": "media"},
                           "b.jsonl", {"path": "c.parquet", "weight": 0.25}])
    assert specs == [DatasetSpec("a.jsonl", 2.0, "sharegpt", "media"), DatasetSpec("b.jsonl", 1.0, "auto", None),
                     DatasetSpec("c.parquet", 0.25, "auto", None)]
    assert all(isinstance(s.weight, float) for s in specs)


@pytest.mark.parametrize("value, message", [
    ({"weight": 2}, "path"),  # no path
    ([{"weight": 2.0, "format": "openai"}], "path"),
    ([{"path": "a.jsonl", "wieght": 2}], "path .*weight"),  # unknown key: the accepted keys are listed
    ([{"path": "a.jsonl", "weight": 0}], "weight 0 of a.jsonl must be a positive number"),
    ([{"path": "a.jsonl", "weight": -1.5}], "weight -1.5 of a.jsonl must be a positive number"),
    ([{"path": "a.jsonl", "weight": float("nan")}], "weight nan"),
    ([{"path": "a.jsonl", "weight": float("inf")}], "weight inf"),
    ([{"path": "a.jsonl", "weight": "abc"}], "weight 'abc' of a.jsonl must be a positive number"),
    ([], "empty list"),
    ([3], "not a dataset"),
    (5, "not a dataset"),  # neither a path nor a list
    (True, "not a dataset"),
])
@pytest.mark.parametrize("key", ["data.train", "data.valid"])
def test_dataset_specs_errors_name_the_key(value, message, key):
    with pytest.raises(DataError, match=message) as info:
        dataset_specs(value, key)
    assert str(info.value).startswith(key), str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# MixedDataset: weights, counts, locations
# --------------------------------------------------------------------------------------------------------------------


def _records_of(ds: MixedDataset, path: str) -> list[str]:
    """The locations of the entries of ``path``, in entry order."""
    return [ds.location(i) for i in range(len(ds)) if ds.location(i).rsplit(":", 1)[0] == path]


def test_weights_whole_and_fractional(dirty, renderer):
    out, manifest = dirty
    msgs, parquet, openai = (str(out / f) for f in ("messages.jsonl", "data.parquet", "openai.jsonl"))
    n = manifest["num_records"]
    n_msgs, n_parquet, n_openai = n["messages.jsonl"], n["data.parquet"], n["openai.jsonl"]
    lines = [f"{msgs}:{k}" for k in range(1, n_msgs + 1)]
    rows = [f"{parquet}:row {k}" for k in range(n_parquet)]

    once = MixedDataset(dataset_specs([msgs, parquet]), renderer)
    assert len(once) == n_msgs + n_parquet
    assert once.counts() == {msgs: n_msgs, parquet: n_parquet}
    assert [once.location(i) for i in range(len(once))] == lines + rows  # file by file, each record once

    spec = [{"path": msgs, "weight": 2}, {"path": parquet, "weight": 0.5}, {"path": openai, "weight": 1.5}]
    half = round(n_parquet / 2)
    mixes = {seed: MixedDataset(dataset_specs(spec), renderer, seed=seed) for seed in (0, 1, 2)}
    for ds in mixes.values():
        assert ds.counts() == {msgs: 2 * n_msgs, parquet: half, openai: n_openai + round(n_openai / 2)}
        assert len(ds) == sum(ds.counts().values())
        assert Counter(_records_of(ds, msgs)) == Counter({loc: 2 for loc in lines})  # weight 2: every record twice
        picked = _records_of(ds, parquet)
        assert len(set(picked)) == len(picked) == half and set(picked) <= set(rows)  # weight 0.5: a distinct half
        by_count = Counter(Counter(_records_of(ds, openai)).values())
        assert by_count == {2: round(n_openai / 2), 1: n_openai - round(n_openai / 2)}  # 1.5: all once, half twice
    # The fractional subset is a function of the seed: the same for the same seed, another for another seed.
    again = MixedDataset(dataset_specs(spec), renderer, seed=1)
    assert _records_of(again, parquet) == _records_of(mixes[1], parquet)
    subsets = {tuple(_records_of(ds, parquet)) for ds in mixes.values()}
    assert len(subsets) > 1


def test_weighted_entry_renders_its_record(dirty, renderer):
    """An entry of a weighted mix renders the record its location names (checked against the weight-1 mix)."""
    out, manifest = dirty
    msgs, parquet = str(out / "messages.jsonl"), str(out / "data.parquet")
    plain = MixedDataset(dataset_specs([msgs, parquet]), renderer)
    by_location = {plain.location(i): i for i in range(len(plain))}
    weighted = MixedDataset(dataset_specs([{"path": parquet, "weight": 0.5}, {"path": msgs, "weight": 2}]),
                            renderer, seed=5)
    checked = 0
    for i in range(len(weighted)):
        a, b = weighted[i], plain[by_location[weighted.location(i)]]
        assert type(a) is type(b)
        if isinstance(a, Sample):
            assert a.location == weighted.location(i) and a.index == i
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            checked += 1
        else:
            assert (a.reason, a.location) == (b.reason, b.location)
    assert checked >= 5
    with pytest.raises(IndexError):
        weighted[len(weighted)]


def test_locations_match_manifest(dirty, mix):
    out, manifest = dirty
    locations = [mix.location(i) for i in range(len(mix))]
    expected = []
    for name in manifest["files"]:
        count = manifest["num_records"][name]
        where = [f"row {k}" for k in range(count)] if name.endswith(".parquet") else range(1, count + 1)
        expected += [f"{out / name}:{w}" for w in where]
    assert locations == expected
    assert {manifest_location(out, e) for e in manifest["bad"]} <= set(locations)


# --------------------------------------------------------------------------------------------------------------------
# MixedDataset over a dirty dataset: exactly the manifest's bad records are skipped, for the manifest's reason
# --------------------------------------------------------------------------------------------------------------------


def test_dirty_dataset_skips_exactly_the_manifest(dirty, mix, model_args, processor):
    out, manifest = dirty
    expected = {manifest_location(out, e): e["reason"] for e in manifest["bad"]}
    assert len(expected) == len(manifest["bad"])
    shape = make_shape(model_args, processor)
    skipped, kept = {}, 0
    for i in range(len(mix)):
        item = mix[i]
        if isinstance(item, Sample):
            assert item.location == mix.location(i) and item.index == i
            assert item.num_loss_tokens > 0
            try:
                fitted = fit_length(item, shape, processor.tokenizer)
            except SkipSample as skip:  # over-long: a Sample from the dataset, dropped by data.overlong=drop
                item = skip
            else:
                assert fitted is item
                kept += 1
                continue
        assert isinstance(item, SkipSample), item
        assert item.location not in skipped
        skipped[item.location] = item.reason
        assert item.location == mix.location(i)
    assert skipped == expected
    assert kept == manifest["num_clean"]
    assert Counter(skipped.values()) == manifest["expected_skips"]
    assert set(manifest["expected_skips"]) >= {"bad_json", "bad_record", "missing_media", "corrupt_image",
                                               "corrupt_video", "media_mismatch", "no_labels", "too_long"}


def test_strict_raises_with_reason_and_location(dirty, renderer, mix):
    out, manifest = dirty
    strict = MixedDataset(mix.specs, renderer, strict=True)
    index_of = {mix.location(i): i for i in range(len(mix))}
    bad = [e for e in manifest["bad"] if e["reason"] != "too_long"]  # over-long records render fine
    for entry in bad:
        location = manifest_location(out, entry)
        with pytest.raises(DataError) as info:
            strict[index_of[location]]
        message = str(info.value)
        assert f"{entry['reason']} at {location}:" in message and "data.strict" in message, message
    bad_locations = {manifest_location(out, e) for e in manifest["bad"]}
    good = [i for loc, i in index_of.items() if loc not in bad_locations][:4]
    assert all(isinstance(strict[i], Sample) for i in good)


# --------------------------------------------------------------------------------------------------------------------
# fit_length
# --------------------------------------------------------------------------------------------------------------------


def test_fit_length_drop_and_error(clean_samples, model_args, processor):
    sample = max(clean_samples, key=len)
    n = len(sample)
    for policy in ("drop", "error", "truncate_text"):
        assert fit_length(sample, make_shape(model_args, processor, seq_length=n, overlong=policy)) is sample
    with pytest.raises(SkipSample) as info:
        fit_length(sample, make_shape(model_args, processor, seq_length=n - 1, overlong="drop"))
    assert info.value.reason == "too_long" and info.value.location == sample.location
    assert f"{n} tokens" in info.value.detail and f"data.seq_length={n - 1}" in info.value.detail
    with pytest.raises(DataError, match=rf"data\.seq_length={n - 1}") as info:
        fit_length(sample, make_shape(model_args, processor, seq_length=n - 1, overlong="error"))
    assert sample.location in str(info.value) and "data.overlong" in str(info.value)
    with pytest.raises(DataError, match="data.overlong='cut'"):
        make_shape(model_args, processor, overlong="cut")


def _token_chars(tokenizer, ids: list[int]) -> list[int]:
    """``ends[k]`` = characters of the decoded text of ``ids[:k]`` (``ends[0] = 0``)."""
    return [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]


def _blocks(ids: list[int], text: str, ends: list[int], grids_t: list[int], shape: BatchShape):
    """Independently of pipeline.media_spans: the ``(start, end, kind, n_frames)`` token ranges of each image block
    and of each whole video, a video starting at the token holding the ``<`` of its first ``<t seconds>`` text."""
    starts = [p for p, t in enumerate(ids) if t == shape.vision_start_token_id]
    stamps = [m.start() for m in TIMESTAMP.finditer(text)]
    assert len(stamps) == sum(grids_t)  # one timestamp per frame block, nowhere else
    token_at = [next(k for k in range(len(ids)) if ends[k + 1] > c) for c in stamps]  # token holding the '<'
    blocks, frames, stamp = [], list(grids_t), 0
    k = 0
    while k < len(starts):
        p = starts[k]
        end = ids.index(shape.vision_end_token_id, p) + 1
        if ids[p + 1] == shape.image_token_id:
            blocks.append((p, end, "image", 0))
            k += 1
            continue
        t = frames.pop(0)
        first = token_at[stamp]
        for _ in range(t):  # t frame blocks, each right after its timestamp
            assert token_at[stamp] < starts[k] and ids[starts[k] + 1] == shape.video_token_id
            end = ids.index(shape.vision_end_token_id, starts[k]) + 1
            stamp += 1
            k += 1
        blocks.append((first, end, "video", t))
    assert not frames
    return blocks


def _rope(sample: Sample, model_args) -> torch.Tensor:
    positions, _ = get_rope_index(
        sample.input_ids[None], sample.image_grid_thw, sample.video_grid_thw, image_token_id=model_args.image_token_id,
        video_token_id=model_args.video_token_id, vision_start_token_id=model_args.vision_start_token_id,
        spatial_merge_size=model_args.vision.spatial_merge_size)
    return positions


def _check_truncations(sample: Sample, shape: BatchShape, tokenizer, model_args) -> Counter:
    ids = sample.input_ids.tolist()
    n = len(ids)
    text = tokenizer.decode(ids)
    ends = _token_chars(tokenizer, ids)
    grids_t = [] if sample.video_grid_thw is None else sample.video_grid_thw[:, 0].tolist()
    blocks = _blocks(ids, text, ends, grids_t, shape)
    labels = sample.labels
    full_positions = _rope(sample, model_args)
    outcomes = Counter()
    for limit in range(1, n + 1):
        trainable = bool((labels[1:limit] != IGNORE_INDEX).any())  # a target after position 0 within the limit
        try:
            cut = fit_length(sample, dataclasses.replace(shape, seq_length=limit), tokenizer)
        except SkipSample as skip:
            assert not trainable, limit
            assert skip.reason == "too_long" and skip.location == sample.location
            outcomes["skip"] += 1
            continue
        assert trainable, limit
        if limit == n:
            assert cut is sample
            continue
        m = len(cut)
        # Cut at the limit, or at the start of the one image/video the limit falls inside.
        inside = [start for start, end, _, _ in blocks if start < limit < end]
        assert m == (inside[0] if inside else limit), (limit, m, inside)
        assert torch.equal(cut.input_ids, sample.input_ids[:m]) and torch.equal(cut.labels, sample.labels[:m])
        assert (cut.index, cut.location) == (sample.index, sample.location)
        kept = [b for b in blocks if b[1] <= m]
        assert all(b[0] >= m for b in blocks if b[1] > m)  # nothing of a removed block is left
        head = cut.input_ids.tolist()
        assert head.count(shape.vision_start_token_id) == head.count(shape.vision_end_token_id)
        kept_text = tokenizer.decode(head)
        assert text.startswith(kept_text)
        kept_frames = [t for _, _, kind, t in kept if kind == "video"]
        assert len(TIMESTAMP.findall(kept_text)) == sum(kept_frames)  # no timestamp of a removed video
        assert not re.search(r"<[\d.]*( s\w*)?>?\s*$", kept_text)  # not even a piece of one
        n_img = sum(kind == "image" for _, _, kind, _ in kept)
        for pixels, grid, full_pixels, full_grid, count in (
            (cut.pixel_values, cut.image_grid_thw, sample.pixel_values, sample.image_grid_thw, n_img),
            (cut.pixel_values_videos, cut.video_grid_thw, sample.pixel_values_videos, sample.video_grid_thw,
             len(kept_frames)),
        ):
            if count == 0:
                assert pixels is None and grid is None
                continue
            assert torch.equal(grid, full_grid[:count])
            rows = int(grid.prod(-1).sum())
            assert torch.equal(pixels, full_pixels[:rows])
        if kept_frames:
            assert cut.video_grid_thw[:, 0].tolist() == kept_frames
        outcomes["cut" if m < limit else "exact"] += 1
        # The model side agrees: the placeholder runs match the grids (get_rope_index raises otherwise), and the
        # MRoPE positions are those of the whole sample's first m tokens.
        assert torch.equal(_rope(cut, model_args), full_positions[:, :, :m])
    return outcomes


def test_truncate_text_every_cut(clean_samples, late_media, model_args, processor):
    """For every cut length of samples with images and videos: a prefix that never ends inside an image or a video,
    with exactly the kept media's pixels and grids, or a too_long skip when nothing trainable is left."""
    shape = make_shape(model_args, processor, seq_length=1, overlong="truncate_text")
    chosen = list(late_media)
    chosen += [s for s in clean_samples if s.video_grid_thw is not None and s.image_grid_thw is not None][:1]
    chosen += [s for s in clean_samples if s.video_grid_thw is not None and s.image_grid_thw is None][:1]
    assert len(chosen) == 4
    assert max(int(s.video_grid_thw[:, 0].max()) for s in chosen if s.video_grid_thw is not None) >= 2
    totals = Counter()
    for sample in chosen:
        totals += _check_truncations(sample, shape, processor.tokenizer, model_args)
    assert totals["skip"] and totals["cut"] and totals["exact"], totals


def test_truncate_drops_a_whole_video(late_media, model_args, processor):
    """A limit inside the last frame block of a video removes the whole video: its earlier frames, their timestamps
    and its pixels; the image before it stays."""
    sample = late_media[0]  # image, video | video, image
    tokenizer = processor.tokenizer
    ids = sample.input_ids.tolist()
    video_starts = [p for p, t in enumerate(ids) if t == model_args.vision_start_token_id and
                    ids[p + 1] == model_args.video_token_id]
    frames = int(sample.video_grid_thw[0, 0])
    assert frames >= 2
    last_frame = video_starts[frames - 1]
    cut = fit_length(sample, make_shape(model_args, processor, seq_length=last_frame + 2, overlong="truncate_text"),
                     tokenizer)
    assert cut.video_grid_thw is None and cut.pixel_values_videos is None
    assert len(cut) < video_starts[0] and "seconds>" not in tokenizer.decode(cut.input_ids)
    assert tokenizer.decode(cut.input_ids).endswith("<|vision_end|> and ")  # the text before the video's timestamp
    assert cut.image_grid_thw.shape[0] == 1
    assert torch.equal(cut.pixel_values, sample.pixel_values[: int(sample.image_grid_thw[0].prod())])


# --------------------------------------------------------------------------------------------------------------------
# StepBatches and step_loader
# --------------------------------------------------------------------------------------------------------------------


def _expected_kept(mix, indices, shape) -> list[Sample]:
    kept = []
    for i in indices:
        item = mix[i]
        if isinstance(item, Sample) and len(item) <= shape.seq_length:
            kept.append(item)
    return kept


def _skips(step) -> list[tuple[str, str]]:
    # (reason, location): the detail of an undecodable embedded image quotes PIL's message, which names the
    # BytesIO object by its address (different in every process)
    return [(reason, location) for reason, location, _ in step.skips]


def _same_step(a, b) -> None:
    assert (a.consumed, a.indices, a.lengths, _skips(a), a.truncated) == (b.consumed, b.indices, b.lengths, _skips(b),
                                                                          b.truncated)
    assert (a.grids is None) == (b.grids is None) and (a.grids is None or torch.equal(a.grids, b.grids))
    assert len(a.microbatches) == len(b.microbatches)
    for x, y in zip(a.microbatches, b.microbatches):
        for name in ("input_ids", "labels", "attention_mask", "position_ids", "cu_seqlens", "pixel_values",
                     "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            assert u is None or torch.equal(u, v), name


def _segments(mb) -> list[tuple[int, int]]:
    cu = mb.cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def test_packed_steps(mix, model_args, processor):
    shape = make_shape(model_args, processor)
    tokenizer = processor.tokenizer
    sampler = GlobalBatchSampler(len(mix), GBS, seed=4)
    one = StepBatches(mix, sampler, shape, dp_rank=0, dp_size=1, tokenizer=tokenizer)
    ranks = [StepBatches(mix, sampler, shape, dp_rank=r, dp_size=2, tokenizer=tokenizer) for r in range(2)]
    total_bins = 0
    for consumed in (0, GBS, 5 * GBS + 3):
        whole = one[consumed]
        _same_step(whole, StepBatches(mix, GlobalBatchSampler(len(mix), GBS, seed=4), shape, dp_rank=0, dp_size=1,
                                      tokenizer=tokenizer)[consumed])  # deterministic
        assert whole.indices == sampler.global_batch(consumed)
        shares = [steps[consumed] for steps in ranks]
        assert shares[0].indices + shares[1].indices == whole.indices  # the ranks' shares make the global batch
        assert sorted(_skips(shares[0]) + _skips(shares[1])) == sorted(_skips(whole))
        for step in (whole, *shares):
            kept = _expected_kept(mix, step.indices, shape)
            assert len(step.skips) == len(step.indices) - len(kept)
            assert sorted(step.lengths) == sorted(len(s) for s in kept)
            segments, segment_lengths = Counter(), []
            for mb in step.microbatches:
                assert mb.input_ids.shape == (1, SEQ) and mb.cu_seqlens[0] == 0
                real = int(mb.cu_seqlens[-1])
                assert real <= SEQ and int(mb.attention_mask.sum()) == real
                assert bool(mb.attention_mask[0, :real].all())
                assert bool((mb.input_ids[0, real:] == shape.pad_token_id).all())
                image_rows = video_rows = 0
                for a, b in _segments(mb):
                    ids = tuple(mb.input_ids[0, a:b].tolist())
                    sample = next(s for s in kept if tuple(s.input_ids.tolist()) == ids)
                    assert torch.equal(mb.labels[0, a:b], shift_labels(sample.labels[None])[0])
                    segments[ids] += 1
                    segment_lengths.append(b - a)
                    image_rows += 0 if sample.image_grid_thw is None else int(sample.image_grid_thw.prod(-1).sum())
                    video_rows += 0 if sample.video_grid_thw is None else int(sample.video_grid_thw.prod(-1).sum())
                assert (0 if mb.pixel_values is None else mb.pixel_values.shape[0]) == image_rows
                assert (0 if mb.pixel_values_videos is None else mb.pixel_values_videos.shape[0]) == video_rows
            # Every kept sample exactly once, over all bins.
            assert segments == Counter(tuple(s.input_ids.tolist()) for s in kept)
            assert sorted(segment_lengths) == sorted(len(s) for s in kept)
            total_bins += len(step.microbatches)
            grids = [g for s in kept for g in (s.image_grid_thw, s.video_grid_thw) if g is not None]
            assert (step.grids is None) == (not grids)
            if grids:
                assert step.grids.shape[0] == sum(g.shape[0] for g in grids)
    assert total_bins > 6


def test_unpacked_steps(mix, model_args, processor):
    shape = make_shape(model_args, processor, packing=False, micro_batch_size=2)
    sampler = GlobalBatchSampler(len(mix), GBS, seed=4)
    steps = StepBatches(mix, sampler, shape, dp_rank=1, dp_size=2, tokenizer=processor.tokenizer)
    parities = set()
    for consumed in range(0, 6 * GBS, GBS):
        step = steps[consumed]
        kept = _expected_kept(mix, step.indices, shape)
        assert len(step.microbatches) == math.ceil(len(kept) / 2) and kept
        parities.add(len(kept) % 2)
        rows = [(mb, r) for mb in step.microbatches for r in range(2)]
        for k, (mb, r) in enumerate(rows):
            assert mb.input_ids.shape == (2, SEQ) and mb.cu_seqlens is None
            if k < len(kept):
                n = len(kept[k])
                assert torch.equal(mb.input_ids[r, :n], kept[k].input_ids)
                assert int(mb.attention_mask[r].sum()) == n
            else:  # the last micro-batch's padding row
                assert int(mb.attention_mask[r].sum()) == 0 and bool((mb.labels[r] == IGNORE_INDEX).all())
    assert parities == {0, 1}  # full micro-batches, and a last one with a padding row
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        StepBatches(mix, sampler, make_shape(model_args, processor, packing=False, micro_batch_size=3), dp_rank=0,
                    dp_size=1)
    with pytest.raises(DataError, match="data.micro_batch_size=1"):
        make_shape(model_args, processor, packing=True, micro_batch_size=2)


def test_step_loader_workers_match_inline_from_a_resume_position(mix, model_args, processor):
    shape = make_shape(model_args, processor)
    steps = StepBatches(mix, GlobalBatchSampler(len(mix), GBS, seed=4), shape, dp_rank=0, dp_size=1,
                        tokenizer=processor.tokenizer)
    start, count = 3 * GBS, 4
    inline = step_loader(steps, start, num_workers=0)
    inline_steps = [next(inline) for _ in range(count)]
    # This process has just decoded videos (inline): forked workers must still decode theirs (PyAV's per-thread
    # scaler is inherited without its threads). A hang fails the test instead of blocking it.
    assert any(mb.pixel_values_videos is not None for s in inline_steps for mb in s.microbatches)
    loader = [step_loader(steps, start, num_workers=2, prefetch=1)]
    worker_steps = []
    reader = threading.Thread(target=lambda: worker_steps.extend(next(loader[0]) for _ in range(count)), daemon=True)
    reader.start()
    reader.join(timeout=120)
    assert not reader.is_alive(), "DataLoader workers hung"
    loader.clear()  # shuts the workers down
    assert len(worker_steps) == count
    assert [s.consumed for s in inline_steps] == [start + k * GBS for k in range(count)]
    for a, b in zip(inline_steps, worker_steps):
        _same_step(a, b)
        _same_step(a, steps[a.consumed])
    assert sum(len(s.skips) for s in inline_steps) > 0  # the skips travel back from the workers too


def test_empty_microbatch(model_args, processor):
    for packing, mbs in ((True, 1), (False, 3)):
        shape = make_shape(model_args, processor, seq_length=64, packing=packing, micro_batch_size=mbs)
        mb = empty_microbatch(shape)
        assert mb.input_ids.shape == mb.labels.shape == mb.attention_mask.shape == (mbs, 64)
        assert bool((mb.input_ids == shape.pad_token_id).all())
        assert bool((mb.labels == IGNORE_INDEX).all()) and int(mb.attention_mask.sum()) == 0
        assert mb.pixel_values is None and mb.pixel_values_videos is None
        assert mb.image_grid_thw is None and mb.video_grid_thw is None


# --------------------------------------------------------------------------------------------------------------------
# tools/data/inspect.py
# --------------------------------------------------------------------------------------------------------------------


def _inspect(*args: str) -> str:
    proc = subprocess.run([sys.executable, "tools/data/inspect.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_inspect_sample(dirty, mix):
    out, manifest = dirty
    path = str(out / "messages.jsonl")
    plain = MixedDataset(dataset_specs(path), mix.renderer)
    index = next(i for i in range(len(plain)) if isinstance(plain[i], Sample) and plain[i].image_grid_thw is not None)
    sample = plain[index]
    text = _inspect("--sample", str(index), f"data.train={path}", f"data.seq_length={SEQ}")
    assert f"entry {index} at {path}:{index + 1}: {len(sample)} tokens, {sample.num_loss_tokens} trained" in text
    g = sample.image_grid_thw[0].tolist()
    assert f"image 0: grid t,h,w = {g} patches -> {g[0] * g[1] * g[2] // 4} tokens" in text
    body = text.split("text ([[trained]]):\n", 1)[1].split("\n  MRoPE", 1)[0]
    trained = re.findall(r"\[\[(.*?)\]\]", body, flags=re.S)
    assert trained and all(t.endswith("<|im_end|>") for t in trained)
    answers = [m["content"] for m in json.loads((out / "messages.jsonl").read_text().splitlines()[index])["messages"]
               if m["role"] == "assistant"]
    assert [t.removesuffix("<|im_end|>") for t in trained] == answers
    assert "MRoPE (t, h, w) at block starts: 0:(0, 0, 0)" in text


def test_inspect_summary(dirty):
    out, manifest = dirty
    files = ",".join(str(out / f) for f in manifest["files"])
    text = _inspect("--summary", f"data.train=[{files}]", f"data.seq_length={SEQ}")
    total = manifest["num_records"]["total"]
    assert f"{total} of {total} entries rendered: {manifest['num_clean']} usable" in text
    skips = {m.group(1): int(m.group(2)) for m in re.finditer(r"^skipped (\w+): (\d+) ", text, flags=re.M)}
    assert skips == manifest["expected_skips"]


def test_inspect_bin(dirty, mix, model_args, processor):
    out, manifest = dirty
    path = str(out / "sharegpt.jsonl")
    text = _inspect("--bin", "0", f"data.train={path}", f"data.seq_length={SEQ}", "data.global_batch_size=4")
    plain = MixedDataset(dataset_specs(path), mix.renderer)
    steps = StepBatches(plain, GlobalBatchSampler(len(plain), 4, seed=0), make_shape(model_args, processor),
                        dp_rank=0, dp_size=1, tokenizer=processor.tokenizer)
    step = steps[0]
    assert f"step 0 (stream position 0): entries {step.indices}, {len(step.skips)} skipped" in text
    printed = [json.loads(m) for m in re.findall(r"cu_seqlens (\[[\d, ]*\])", text)]
    assert printed == [mb.cu_seqlens.tolist() for mb in step.microbatches] and printed


def test_inspect_bad_override_exits_2(dirty, capsys):
    """Exit status 2 and a message for a bad override (in-process: the CLI's main, to spare a subprocess)."""
    spec = importlib.util.spec_from_file_location("_inspect_tool", ROOT / "tools/data/inspect.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)  # the tool drops its own directory from sys.path: restore it after
    finally:
        sys.path[:] = saved
    out, _ = dirty
    assert module.main(["--summary", f"data.train={out / 'messages.jsonl'}", "data.overlong=cut"]) == 2
    assert "data.overlong" in capsys.readouterr().err
    assert module.main(["--summary", "data.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
