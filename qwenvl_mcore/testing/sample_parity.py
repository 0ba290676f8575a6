"""Rendered training samples through our model, each alone or packed into one row as training packs them, against
transformers run on each sample alone: what tools/convert/verify.py --packed / --data checks.

:func:`builtin_samples` and :func:`dataset_samples` run in the launching process (the samples travel to the ranks);
:func:`compare_samples` runs on every rank of a started launch, at any layout (context parallelism included).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist

from qwenvl_mcore.data.sample import Sample

#: The built-in samples of --packed without --data, in row order: an image + video, a text, an image, a video.
BUILTIN_KINDS = ("image_video", "text", "image", "video")
#: A packed row's capacity is its samples' tokens rounded up to this (so a row usually ends in some padding).
ROW_MULTIPLE = 16


class VerifyDataError(ValueError):
    """A --data / --samples value verify cannot use; the message names the fix."""


def builtin_samples(processor) -> list[Sample]:
    """One synthetic conversation of each of BUILTIN_KINDS, rendered by ``processor`` with training's labels (the
    assistant answer and its end-of-turn token)."""
    from qwenvl_mcore.data.synthetic import SyntheticConversations

    return [SyntheticConversations(processor, 1, kinds=(k,), seed=7 + i, max_words=5)[0]
            for i, k in enumerate(BUILTIN_KINDS)]


def dataset_samples(path: str, processor, count: int) -> tuple[list[Sample], list[str]]:
    """The first ``count`` usable records of the dataset file ``path`` (JSONL in the messages / ShareGPT / OpenAI
    formats, or parquet), rendered as training renders them (data.* defaults); and the skipped records before them
    (``"reason at file:line: detail"``). VerifyDataError when the file is missing or holds no usable record."""
    from qwenvl_mcore.data.collate import DataError
    from qwenvl_mcore.data.mixing import DatasetSpec, MixedDataset
    from qwenvl_mcore.data.render import Renderer, RenderOptions

    if count < 1:
        raise VerifyDataError(f"--samples {count}: give at least 1 (the number of records of --data to check).")
    if not os.path.isfile(path):
        raise VerifyDataError(f"--data {path} does not exist or is not a file: give a JSONL (messages, ShareGPT or "
                              "OpenAI format) or parquet dataset file.")
    try:
        dataset = MixedDataset([DatasetSpec(path)], Renderer(processor, RenderOptions()))
    except DataError as e:
        raise VerifyDataError(f"--data {path}: {e}") from None
    samples: list[Sample] = []
    skipped: list[str] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, Sample):
            samples.append(item)
            if len(samples) == count:
                break
        else:
            skipped.append(str(item))
    if not samples:
        shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise VerifyDataError(f"--data {path} has no usable record ({len(skipped)} skipped: {shown}): fix the "
                              "records (tools/data/inspect.py lists why each is skipped) or give another file.")
    return samples, skipped


def _mm_types(ids: torch.Tensor, args) -> torch.Tensor:
    return (ids == args.image_token_id).int() + 2 * (ids == args.video_token_id).int()


def hf_alone(hf_model, sample: Sample, args) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers on ``sample`` alone (one row, no padding): its logits [L, V] (fp32) and per-token losses [L]
    against the sample's shifted labels (0 where ignored)."""
    device = next(hf_model.parameters()).device
    ids = sample.input_ids.unsqueeze(0)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=_mm_types(ids, args),
                  pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw,
                  pixel_values_videos=sample.pixel_values_videos, video_grid_thw=sample.video_grid_thw)
    inputs = {k: v.to(device) for k, v in inputs.items() if v is not None}
    if hasattr(hf_model.model, "rope_deltas"):
        hf_model.model.rope_deltas = None
    logits = hf_model(**inputs, use_cache=False).logits[0].float()
    target = torch.cat([sample.labels[1:], sample.labels.new_full((1,), -100)]).to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits, target.clamp_min(0), reduction="none")
    return logits, loss.masked_fill(target == -100, 0.0)


def _full_row_token_losses(tok: torch.Tensor, row) -> torch.Tensor:
    """Per-token losses of the whole row [s] from this rank's [1, n] (its CP slice) or [1, s] (no CP)."""
    from megatron.core import parallel_state as ps

    from qwenvl_mcore.parallel.context_parallel import RowSplit, as_packed_row

    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return tok[0]
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_context_parallel_group()
    parts = [torch.empty_like(tok) for _ in range(cp)]
    dist.all_gather(parts, tok.contiguous(), group=group)
    packed = as_packed_row(row)
    s = packed.input_ids.shape[1]
    # split as the model splits it: local lengths a multiple of tp under sequence parallelism (which this MoE model
    # needs at tp > 1)
    split = RowSplit.build(packed.cu_seqlens, s, cp, tp)
    return split.unsplit(torch.cat(parts, dim=1), dim=1)[0]


def compare_samples(chunks, hf_model, samples: Sequence[Sample], *, packed: bool, pad_token_id: int) -> dict | None:
    """Our model (through megatron's pipeline schedule, at the started layout) on ``samples`` packed into one row
    (``packed``) or each alone as a one-row micro-batch, against transformers on each sample alone.

    Returns on the last pipeline stage (None elsewhere): max_abs_logit_diff (over every sample's tokens),
    logit_cosine and top1_agreement (all tokens together); loss (token mean over every loss token of the samples,
    from the per-token loss path training uses: loss sums and counts, summed over the CP ranks), loss_diff and
    loss_rel_diff against transformers' token mean; max_sample_loss_rel_diff (each sample's token-mean loss, from
    the per-token losses put back in row order); samples, tokens, loss_tokens and rows."""
    from megatron.core import parallel_state as ps

    from qwenvl_mcore.data.collate import collate
    from qwenvl_mcore.data.packing import pack, rope_token_ids
    from qwenvl_mcore.testing.parity import gather_vocab
    from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches

    args = chunks[0].args
    if packed:
        total = sum(len(s) for s in samples)
        capacity = -(-total // ROW_MULTIPLE) * ROW_MULTIPLE
        row = pack(samples, capacity, pad_token_id, **rope_token_ids(args))
        bounds = row.cu_seqlens.tolist()
        rows = [(row, list(zip(bounds[:-1], bounds[1:])), list(samples))]
    else:
        rows = [(collate([s], len(s), pad_token_id), [(0, len(s))], [s]) for s in samples]

    last = ps.is_pipeline_last_stage()
    ours_logits, ref_logits, sample_rel = [], [], []
    loss_sum = ref_sum = loss_tokens = 0.0
    with torch.no_grad():
        for row, spans, members in rows:
            logits = run_microbatches(chunks, [replace(row, labels=None)], forward_only=True)
            tok = run_microbatches(chunks, [row], forward_only=True)
            sums = run_microbatches(chunks, [row], forward_only=True, loss_for=loss_for_per_token)
            if not last:
                continue
            full = gather_vocab(logits[0])[0].float()  # [s, V]
            per_token = _full_row_token_losses(tok[0], row)
            totals = torch.tensor([float(sums[0]["loss_sum"]), float(sums[0]["tokens"])], dtype=torch.float64)
            if ps.get_context_parallel_world_size() > 1:  # each CP rank reports its slice of the row
                dist.all_reduce(totals, group=ps.get_context_parallel_group())
            loss_sum += float(totals[0])
            loss_tokens += float(totals[1])
            for (a, b), sample in zip(spans, members):
                ref, ref_tok = hf_alone(hf_model, sample, args)
                ours_logits.append(full[a:b].cpu())
                ref_logits.append(ref.cpu())
                n = sample.num_loss_tokens - int(sample.labels[0] != -100)  # the first token is never a target
                mine, theirs = float(per_token[a:b].double().sum()) / n, float(ref_tok.double().sum()) / n
                sample_rel.append(abs(mine - theirs) / max(abs(theirs), 1e-12))
                ref_sum += float(ref_tok.double().sum())
    if not last:
        return None
    ours, ref = torch.cat(ours_logits), torch.cat(ref_logits)
    n_ref = sum(s.num_loss_tokens - int(s.labels[0] != -100) for s in samples)
    loss, ref_loss = loss_sum / loss_tokens, ref_sum / n_ref
    return {
        "max_abs_logit_diff": float((ours - ref).abs().max()),
        "logit_cosine": float(torch.nn.functional.cosine_similarity(ours.reshape(1, -1), ref.reshape(1, -1))),
        "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
        "loss": loss,
        "loss_diff": abs(loss - ref_loss),
        "loss_rel_diff": abs(loss - ref_loss) / max(abs(ref_loss), 1e-12),
        "max_sample_loss_rel_diff": max(sample_rel),
        "samples": len(samples),
        "tokens": int(ours.shape[0]),
        "loss_tokens": int(loss_tokens),
        "ref_loss_tokens": n_ref,
        "rows": len(rows),
    }
