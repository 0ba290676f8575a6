"""Tests of the interim data package: global-batch sampler, synthetic conversations and collate."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from qwenvl_mcore.data import (
    DataError,
    GlobalBatchSampler,
    Sample,
    SyntheticConversations,
    collate,
    shard_for_rank,
    split_microbatches,
)
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX, shift_labels
from qwenvl_mcore.testing import tiny

MERGE_TOKENS = 4  # spatial merge 2 x 2: one placeholder token per 4 patches

# --------------------------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------------------------


def test_every_index_once_per_epoch_with_straddling_batch():
    sampler = GlobalBatchSampler(num_samples=10, global_batch_size=4, seed=3)
    e0, e1, e2 = (sampler.epoch_order(e) for e in range(3))
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1 and e1 != e2  # each epoch is reshuffled
    stream = [i for step in range(15) for i in sampler.global_batch(4 * step)]  # 60 samples = 6 epochs
    for epoch in range(6):
        assert stream[10 * epoch : 10 * (epoch + 1)] == sampler.epoch_order(epoch)
        assert Counter(stream[10 * epoch : 10 * (epoch + 1)]) == Counter(range(10))
    # consumed 8: the last two of epoch 0, then the first two of epoch 1.
    assert sampler.global_batch(8) == e0[8:] + e1[:2]
    assert [sampler.epoch(c) for c in (0, 8, 9, 10, 12, 19, 20)] == [0, 0, 0, 1, 1, 1, 2]


def test_batch_larger_than_dataset_spans_several_epochs():
    sampler = GlobalBatchSampler(num_samples=3, global_batch_size=8, seed=0)
    expected = sampler.epoch_order(0) + sampler.epoch_order(1) + sampler.epoch_order(2)[:2]
    assert sampler.global_batch(0) == expected
    # consumed 8 = epoch 2, offset 2: one from epoch 2, all of epochs 3 and 4, one from epoch 5.
    e = [sampler.epoch_order(k) for k in range(6)]
    assert sampler.global_batch(8) == e[2][2:] + e[3] + e[4] + e[5][:1]


def test_sampler_determinism_and_seed():
    a = GlobalBatchSampler(num_samples=50, global_batch_size=8, seed=1)
    b = GlobalBatchSampler(num_samples=50, global_batch_size=8, seed=1)
    c = GlobalBatchSampler(num_samples=50, global_batch_size=8, seed=2)
    assert a.epoch_order(0) == b.epoch_order(0) and a.epoch_order(5) == b.epoch_order(5)
    assert a.epoch_order(0) != c.epoch_order(0)
    assert a.epoch_order(0) != list(range(50))
    # (seed, epoch) pairs do not alias: seed 1 epoch 0 differs from seed 0 epoch 1.
    assert a.epoch_order(0) != GlobalBatchSampler(50, 8, seed=0).epoch_order(1)
    plain = GlobalBatchSampler(num_samples=7, global_batch_size=3, seed=1, shuffle=False)
    assert plain.epoch_order(4) == list(range(7))
    assert plain.global_batch(6) == [6, 0, 1]


def test_sampler_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    GlobalBatchSampler(num_samples=20, global_batch_size=4, seed=9).global_batch(17)
    assert torch.equal(torch.rand(3), expected)


def test_resume_at_any_position_matches_stream():
    sampler = GlobalBatchSampler(num_samples=13, global_batch_size=5, seed=7)
    stream = [i for e in range(6) for i in sampler.epoch_order(e)]
    for consumed in range(60):
        resumed = GlobalBatchSampler(num_samples=13, global_batch_size=5, seed=7)  # a fresh object, as after restart
        assert resumed.global_batch(consumed) == stream[consumed : consumed + 5]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_shards_concatenate_to_global_batch(dp):
    sampler = GlobalBatchSampler(num_samples=10, global_batch_size=8, seed=0)
    for consumed in (0, 8, 16):
        batch = sampler.global_batch(consumed)
        shards = [shard_for_rank(batch, r, dp) for r in range(dp)]
        assert all(len(s) == 8 // dp for s in shards)
        assert [i for s in shards for i in s] == batch
        micro = split_microbatches(shards[0], 2)
        assert [i for m in micro for i in m] == shards[0] and all(len(m) == 2 for m in micro)


def test_sampler_errors():
    with pytest.raises(ValueError, match="data.global_batch_size"):
        GlobalBatchSampler(num_samples=10, global_batch_size=0, seed=0)
    with pytest.raises(ValueError, match="data.num_samples"):
        GlobalBatchSampler(num_samples=0, global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="6 samples .* 4 data-parallel"):
        shard_for_rank(list(range(6)), 0, 4)
    with pytest.raises(ValueError, match="micro_batch_size=4"):
        split_microbatches(list(range(6)), 4)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic conversations
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    return tiny.build_processor(tiny.build_tokenizer())


@pytest.fixture(scope="module")
def dataset(processor):
    return SyntheticConversations(processor, 40, seed=0)


@pytest.fixture(scope="module")
def samples(dataset):
    return [dataset[i] for i in range(len(dataset))]


def _media_kind(sample: Sample) -> str:
    kinds = {(False, False): "text", (True, False): "image", (False, True): "video", (True, True): "image_video"}
    return kinds[(sample.pixel_values is not None, sample.pixel_values_videos is not None)]


def _assert_samples_equal(a: Sample, b: Sample) -> None:
    for name in ("input_ids", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.index == b.index


def _seed_global_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_same_index_is_bit_equal_and_independent_of_global_rng(processor, dataset, samples):
    _seed_global_rngs(0)
    again = SyntheticConversations(processor, 40, seed=0)
    for i in (0, 7, 39):
        _assert_samples_equal(dataset[i], samples[i])
        _assert_samples_equal(again[i], samples[i])
    _seed_global_rngs(1)
    _assert_samples_equal(again[7], samples[7])
    # Nor does building a sample consume global random numbers.
    _seed_global_rngs(2)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    _seed_global_rngs(2)
    _ = again[11]
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]
    other_seed = SyntheticConversations(processor, 40, seed=1)
    assert any(not torch.equal(other_seed[i].input_ids, samples[i].input_ids) for i in range(4))


def test_samples_vary_and_cover_kinds(samples):
    kinds = Counter(_media_kind(s) for s in samples)
    assert set(kinds) == {"text", "image", "video", "image_video"}, kinds
    trained = [int((s.labels != IGNORE_INDEX).sum()) for s in samples]
    lengths = [int(s.input_ids.shape[0]) for s in samples]
    assert len(set(trained)) >= 10 and len(set(lengths)) >= 10
    assert all(s.index == i for i, s in enumerate(samples))
    assert max(lengths) <= 256  # the trainer's default data.seq_length


def test_labels_are_exactly_the_answer_and_end_of_turn(processor, dataset, samples):
    tok = processor.tokenizer
    start_ids = tok.convert_tokens_to_ids("<|im_start|>")
    for i, s in enumerate(samples):
        assert s.input_ids.dtype == torch.long and s.labels.dtype == torch.long
        assert s.labels.shape == s.input_ids.shape
        trained = (s.labels != IGNORE_INDEX).nonzero().flatten()
        first, last = int(trained[0]), int(trained[-1])
        # One contiguous span, copied from the input ids.
        assert trained.tolist() == list(range(first, last + 1))
        assert torch.equal(s.labels[first : last + 1], s.input_ids[first : last + 1])
        # Everything before it ends with "<|im_start|>assistant\n"; after it only the template's trailing newline.
        assert tok.decode(s.input_ids[:first]).endswith("<|im_start|>assistant\n")
        assert int(s.input_ids[:first].eq(start_ids).sum()) == 3
        assert tok.decode(s.input_ids[last + 1 :]) == "\n"
        answer = dataset.conversation(i)[-1]["content"]
        assert tok.decode(s.labels[first : last + 1]) == answer + "<|im_end|>"


def test_placeholders_and_pixel_rows_match_grids(processor, samples):
    tok = processor.tokenizer
    image_id, video_id = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>")
    seen = Counter()
    for s in samples:
        for pixels, grid, token_id, kind in (
            (s.pixel_values, s.image_grid_thw, image_id, "image"),
            (s.pixel_values_videos, s.video_grid_thw, video_id, "video"),
        ):
            n_tokens = int(s.input_ids.eq(token_id).sum())
            if grid is None:
                assert pixels is None and n_tokens == 0
                continue
            seen[kind] += 1
            assert grid.shape == (1, 3) and pixels.dtype == torch.float32
            assert n_tokens == int(grid.prod(-1).sum()) // MERGE_TOKENS > 0
            assert pixels.shape[0] == int(grid.prod(-1).sum())
            assert pixels.shape[1] == 3 * 2 * 16 * 16  # channels x temporal patch x patch x patch
        if s.video_grid_thw is not None:
            # One "<t seconds><|vision_start|>pads<|vision_end|>" block per temporal patch (reference layout), 4 fps.
            text = tok.decode(s.input_ids)
            t = int(s.video_grid_thw[0, 0])
            assert t in (2, 4)
            assert text.count("<|vision_start|>") == t + (s.image_grid_thw is not None)
            stamps = ["<0.1 seconds>", "<0.6 seconds>", "<1.1 seconds>", "<1.6 seconds>"][:t]  # mean of 2 frames
            positions = [text.index(stamp) for stamp in stamps]
            assert positions == sorted(positions) and text.count(" seconds>") == t
    assert seen["image"] > 0 and seen["video"] > 0


def test_dataset_errors(processor, dataset):
    with pytest.raises(IndexError):
        dataset[40]
    with pytest.raises(IndexError):
        dataset[-1]
    with pytest.raises(ValueError, match="data.kinds"):
        SyntheticConversations(processor, 4, kinds=("audio",))
    only_text = SyntheticConversations(processor, 6, kinds=("text",), min_words=3, max_words=3)
    for i in range(6):
        s = only_text[i]
        assert s.pixel_values is None and s.pixel_values_videos is None
        assert len(only_text.conversation(i)[-1]["content"].split()) == 3


# --------------------------------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------------------------------


def test_collate_pads_and_shifts(processor, samples):
    pad = processor.tokenizer.pad_token_id
    batch_samples = samples[:5]
    seq_length = max(int(s.input_ids.shape[0]) for s in batch_samples) + 3
    batch = collate(batch_samples, seq_length, pad)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape == (5, seq_length)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == torch.long
    assert batch.position_ids is None
    for row, s in enumerate(batch_samples):
        n = int(s.input_ids.shape[0])
        assert torch.equal(batch.input_ids[row, :n], s.input_ids)
        assert batch.input_ids[row, n:].eq(pad).all()
        assert int(batch.attention_mask[row].sum()) == n and batch.attention_mask[row, :n].eq(1).all()
        assert torch.equal(batch.labels[row, : n - 1], s.labels[1:])
        assert batch.labels[row, n - 1 :].eq(IGNORE_INDEX).all()
        assert torch.equal(batch.labels[row, :n], shift_labels(s.labels[None])[0])
        # Targets are the next input tokens wherever trained.
        trained = batch.labels[row] != IGNORE_INDEX
        assert torch.equal(batch.labels[row][trained], batch.input_ids[row, 1:][trained[:-1]])
        assert int(trained.sum()) == int((s.labels != IGNORE_INDEX).sum())


def test_collate_concatenates_media_in_sample_order(processor, samples):
    with_images = [s for s in samples if s.pixel_values is not None][:3]
    with_videos = [s for s in samples if s.pixel_values_videos is not None][:2]
    text_only = [s for s in samples if s.pixel_values is None and s.pixel_values_videos is None][:1]
    order = [with_images[0], text_only[0], with_videos[0], with_images[1], with_videos[1], with_images[2]]
    batch = collate(order, 256, processor.tokenizer.pad_token_id)
    images = [s for s in order if s.pixel_values is not None]
    videos = [s for s in order if s.pixel_values_videos is not None]
    assert torch.equal(batch.pixel_values, torch.cat([s.pixel_values for s in images]))
    assert torch.equal(batch.image_grid_thw, torch.cat([s.image_grid_thw for s in images]))
    assert torch.equal(batch.pixel_values_videos, torch.cat([s.pixel_values_videos for s in videos]))
    assert torch.equal(batch.video_grid_thw, torch.cat([s.video_grid_thw for s in videos]))
    assert batch.pixel_values.shape[0] == int(batch.image_grid_thw.prod(-1).sum())
    assert batch.pixel_values_videos.shape[0] == int(batch.video_grid_thw.prod(-1).sum())
    text_batch = collate(text_only, 256, processor.tokenizer.pad_token_id)
    assert text_batch.pixel_values is None and text_batch.image_grid_thw is None
    assert text_batch.pixel_values_videos is None and text_batch.video_grid_thw is None


def test_collate_rejects_long_sample(processor, samples):
    long = max(samples, key=lambda s: s.input_ids.shape[0])
    n = int(long.input_ids.shape[0])
    collate([long], n, processor.tokenizer.pad_token_id)  # exactly seq_length fits
    with pytest.raises(DataError, match=rf"sample {long.index} .*{n} tokens.*data.seq_length={n - 1}") as err:
        collate([samples[0], long], n - 1, processor.tokenizer.pad_token_id)
    assert "raise data.seq_length" in str(err.value)
    with pytest.raises(DataError):
        collate([], 16, 0)
