"""Rank functions of the context-parallel tests (tests/multirank/test_context_parallel.py)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionSegments, segment_attention
from qwenvl_mcore.parallel.context_parallel import RowSplit

ATTENTION_ROWS = ([0, 13, 20, 21, 38], 45), ([0, 3, 40], 40), ([0], 12)


def attention_checks(rank: int, world: int) -> list[dict]:
    """CP attention over `world` gloo ranks (all-gather of K/V, reduce-scatter of dK/dV) against full-row segment
    attention on each rank: worst absolute differences of the output and of dq, dk, dv at the rank's positions."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    group = dist.new_group(list(range(world)))
    out = []
    for i, (cu, s) in enumerate(ATTENTION_ROWS):
        gen = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(s, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
        grad = torch.randn(s, 4, 8, generator=gen, dtype=torch.float64)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = segment_attention(*full, AttentionSegments.packed_row(torch.tensor(cu), s), scale=0.3)
        ref.backward(grad)
        split = RowSplit.build(cu, s, world, multiple=2)
        local = [split.take(t, rank, dim=0, fill=0.0).requires_grad_() for t in (q, k, v)]
        o = split.attention(rank, group).attend(*local, scale=0.3)
        o.backward(split.take(grad, rank, dim=0, fill=0.0))
        src = split.local_source(rank)
        real = src >= 0
        def worst(a, b):
            return float((a - b).abs().max()) if a.numel() else 0.0

        diffs = {"out": worst(o.detach()[real], ref.detach()[src[real]]), "real": int(real.sum())}
        for name, mine, theirs in zip(("dq", "dk", "dv"), local, full):
            diffs[name] = worst(mine.grad[real], theirs.grad[src[real]])
        diffs["padding_grad_zero"] = bool((local[1].grad[~real] == 0).all())
        out.append(diffs)
    dist.destroy_process_group()
    return out


# ------------------------------------------------------------------------------------------------------------------
# The model at a CP layout against transformers on a packed row
# ------------------------------------------------------------------------------------------------------------------

CP_KINDS = ("image_video", "text", "image", "video")  # samples of the packed row, in order
CP_PAD = 5  # padding after the samples
AUX_COEF = 0.5


def cp_row(processor, args, kinds=CP_KINDS):
    """The packed row of the CP checks (samples of `kinds`, then CP_PAD padding tokens) and its samples."""
    from qwenvl_mcore.data.packing import pack, rope_token_ids
    from qwenvl_mcore.data.synthetic import SyntheticConversations

    samples = [SyntheticConversations(processor, 1, kinds=(k,), seed=7 + i, max_words=5)[0]
               for i, k in enumerate(kinds)]
    capacity = sum(len(s) for s in samples) + CP_PAD
    row = pack(samples, capacity, processor.tokenizer.pad_token_id, **rope_token_ids(args))
    return row, samples


def hf_padded_batch(samples, pad_id: int, args) -> dict:
    """The samples as one right-padded transformers batch (what transformers' aux loss sees as the same tokens)."""
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s)], labels[i, :len(s)], mask[i, :len(s)] = s.input_ids, s.labels, 1

    def cat(name):
        parts = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        return torch.cat(parts) if parts else None

    types = (ids == args.image_token_id).int() + 2 * (ids == args.video_token_id).int()
    return dict(input_ids=ids, attention_mask=mask, labels=labels, mm_token_type_ids=types,
                pixel_values=cat("pixel_values"), image_grid_thw=cat("image_grid_thw"),
                pixel_values_videos=cat("pixel_values_videos"), video_grid_thw=cat("video_grid_thw"))


def _reduce_grads(chunks) -> None:
    """Gradients of one row run on every DP replica, each CP rank its slice: SP tensors summed over TP; dense
    tensors summed over DP x CP and divided by DP; experts summed over expert-DP (which spans DP x CP) / DP."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    edp = ps.get_expert_data_parallel_group()
    dp = dist.get_world_size(ps.get_data_parallel_group())
    for model in chunks:
        for name, p in model.named_parameters():
            if p.grad is None:  # e.g. the ViT on a rank without a share of the frames (DDP's buffers hold zeros)
                p.grad = torch.zeros_like(p)
            if getattr(p, "sequence_parallel", False) and dist.get_world_size(tp_group) > 1:
                dist.all_reduce(p.grad, group=tp_group)
            group = edp if ".mlp.experts." in name else dp_cp
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
            p.grad /= dp


def cp_parity_checks(layout_kwargs: dict, processor, hf) -> dict:
    """Our model at a CP layout (parallel state started here) against transformers on the packed row of CP_KINDS
    (or of layout_kwargs["kinds"]).

    Returns (numbers only; the test asserts): the sample lengths and 2*cp; per sample the worst |dlogit| at its
    real tokens (last stage) and |dloss| of its token-mean loss; |dloss| of the row's global token mean through
    the per-token schedule (loss sums and counts summed over DP x CP); whether the position ids each rank's rotary
    received equal transformers' ids of each sample alone at that rank's positions; the aux loss difference; the
    worst relative gradient difference (LM token-sum + AUX_COEF * aux) over every HF parameter this stage holds and
    the names compared; the routers' token count against layers x real tokens; on the first stage, the patches
    this rank's ViT encoded and the row's patches; parity.compare_forward's report for every one-row sample kind
    (unpacked rows; None off the last stage)."""
    from megatron.core import parallel_state as ps

    from qwenvl_mcore.conversion import engine
    from qwenvl_mcore.conversion.transforms import TRANSFORMERS5
    from qwenvl_mcore.models.qwen3_vl_moe.hf_mapping import Context
    from qwenvl_mcore.parallel import ParallelLayout
    from qwenvl_mcore.parallel.context_parallel import RowSplit
    from qwenvl_mcore.testing import parity
    from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches

    layout_kwargs = dict(layout_kwargs)
    kinds = layout_kwargs.pop("kinds", CP_KINDS)
    layout = ParallelLayout(**layout_kwargs)
    parity.start(layout)
    chunks, ctx = parity.build_pair(hf, layout)
    model = chunks[0]
    args = model.args
    cp = layout.cp
    cp_group, cp_rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    row, samples = cp_row(processor, args, kinds)
    s = row.input_ids.shape[1]
    bounds = list(zip(row.cu_seqlens[:-1].tolist(), row.cu_seqlens[1:].tolist()))
    res: dict = {"lengths": [b - a for a, b in bounds], "two_cp": 2 * cp, "pad": s - int(row.cu_seqlens[-1]),
                 "last_stage": ps.is_pipeline_last_stage(), "n_hf_params": len(list(hf.parameters()))}
    pad_id = processor.tokenizer.pad_token_id
    ref_batch = hf_padded_batch(samples, pad_id, args)

    # transformers: logits, losses, aux and gradients of (token-sum LM loss + AUX_COEF * aux)
    hf.train()
    hf.zero_grad(set_to_none=True)
    hf.config.text_config.router_aux_loss_coef = AUX_COEF
    hf.model.rope_deltas = None
    ref = hf(**ref_batch, output_router_logits=True, use_cache=False)
    shifted = torch.cat([ref_batch["labels"][:, 1:], torch.full_like(ref_batch["labels"][:, :1], -100)], 1)
    n_tokens = int((shifted != -100).sum())
    lm_mean = ref.loss - AUX_COEF * ref.aux_loss
    (lm_mean * n_tokens + AUX_COEF * ref.aux_loss).backward()
    hf_grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in hf.named_parameters()}
    token_loss = torch.nn.functional.cross_entropy(ref.logits.detach().flatten(0, 1), shifted.flatten(),
                                                   reduction="none", ignore_index=-100).view_as(shifted)
    hf_sample_loss = [float(token_loss[i].sum() / (shifted[i] != -100).sum()) for i in range(len(samples))]

    # the position ids each rank's rotary receives and the patches its ViT encodes (first forward below)
    seen, encoded = [], []
    hook = model.rotary.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().cpu()))
    vit_hook = (model.vision.register_forward_hook(lambda m, i, o: encoded.append(int(i[0].shape[0])))
                if model.pre_process else None)
    for c in chunks:
        c.eval()
    with torch.no_grad():
        logits = run_microbatches(chunks, [replace_labels(row, None)], forward_only=True)
        if vit_hook is not None:
            vit_hook.remove()
            total = sum(int(t.shape[0]) for t in (row.pixel_values, row.pixel_values_videos) if t is not None)
            res["vit_patches"] = (sum(encoded), total)
        losses = run_microbatches(chunks, [row], forward_only=True, loss_for=loss_for_per_token)
        tok = run_microbatches(chunks, [row], forward_only=True)  # last stage: [1, n], this rank's slice
    hook.remove()
    split = RowSplit.build(row.cu_seqlens, s, cp, layout.tp if layout.sequence_parallel else 1)
    rope_ok = bool(seen) and seen[0].shape == (3, 1, split.n)
    if rope_ok:
        src = split.local_source(cp_rank)
        for i, (a, b) in enumerate(bounds):
            hf.model.rope_deltas = None
            mine = (src >= a) & (src < b)
            ids = samples[i].input_ids.unsqueeze(0)
            types = (ids == args.image_token_id).int() + 2 * (ids == args.video_token_id).int()
            alone, _ = hf.model.get_rope_index(ids, types, samples[i].image_grid_thw, samples[i].video_grid_thw,
                                               attention_mask=torch.ones_like(ids))
            rope_ok &= bool(torch.equal(seen[0][:, 0, mine], alone[:, 0, src[mine] - a]))
    res["rope_equal"] = rope_ok

    if logits:
        full = parity.gather_vocab(logits[0])  # [1, s, V]
        res["logit_diff"] = [float((full[0, a:b] - ref.logits.detach()[i, :b - a]).abs().max())
                             for i, (a, b) in enumerate(bounds)]
        res["top1"] = [bool(torch.equal(full[0, a:b].argmax(-1), ref.logits[i, :b - a].argmax(-1)))
                       for i, (a, b) in enumerate(bounds)]
        # per-sample losses from the ranks' slices of per-token losses, put back in row order
        tok = tok[0]
        parts = [torch.empty_like(tok) for _ in range(cp)]
        dist.all_gather(parts, tok.contiguous(), group=cp_group)
        per_token = split.unsplit(torch.cat(parts, dim=1), dim=1)[0]
        labels = row.labels[0]
        res["loss_diff"] = [abs(float(per_token[a:b].sum() / (labels[a:b] != -100).sum()) - h)
                            for (a, b), h in zip(bounds, hf_sample_loss)]
        total = torch.tensor([float(losses[0]["loss_sum"]), float(losses[0]["tokens"])], dtype=torch.float64)
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        dp = dist.get_world_size(ps.get_data_parallel_group())
        res["row_loss_diff"] = abs(float(total[0] / total[1]) - float(lm_mean))
        res["row_tokens"] = (float(total[1]) / dp, n_tokens)

    # unpacked one-row batches of every kind (what tools/convert/verify.py feeds): logits and loss vs transformers
    from qwenvl_mcore.testing import tiny

    res["single_rows"] = {}
    for kind in tiny.SAMPLE_KINDS:
        batch = tiny.sample_inputs(processor, kind)
        if batch["input_ids"].shape[0] == 1:
            res["single_rows"][kind] = parity.compare_forward(chunks, hf, batch)

    # gradients of (LM token sum + AUX_COEF * aux), through megatron's schedule in per-token mode
    configs = {id(c.config): c.config for c in chunks}.values()
    saved = [cfg.calculate_per_token_loss for cfg in configs]
    try:
        for cfg in configs:
            cfg.calculate_per_token_loss = True
        for c in chunks:
            c.train()
            c.zero_grad(set_to_none=True)
            c.aux_loss_coeff, c.aux_loss_scale = AUX_COEF, 1.0
        run_microbatches(chunks, [row], forward_only=False, loss_for=loss_for_per_token)
    finally:
        for cfg, value in zip(configs, saved):
            cfg.calculate_per_token_loss = value
    _reduce_grads(chunks)
    ours: dict[str, torch.Tensor] = {}
    for c in chunks:
        ours.update(engine.gather_hf_tensors(c, Context(ctx.args, expert_layout=TRANSFORMERS5), source="grad"))
    worst, worst_name = parity.worst_relative(ours, hf_grads)
    res["grad_rel"], res["grad_worst"], res["compared"] = worst, worst_name, sorted(ours)
    res["aux_diff"] = max(abs(v - float(ref.aux_loss)) for v in model.routing.aux_losses())
    totals = model.routing.micro[0].totals()
    e = args.text.num_experts
    res["routing_tokens"] = (float(totals[2 * e]), args.text.num_hidden_layers * int(row.cu_seqlens[-1]))

    # a frozen ViT and merger (ranks without a share of the frames included): the step completes, no grad reaches them
    frozen = [p for p in model.vision.parameters()] if model.pre_process else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        for c in chunks:
            c.zero_grad(set_to_none=True)
        reports = run_microbatches(chunks, [row], forward_only=False, loss_for=loss_for_per_token)
        res["frozen_vit_loss_finite"] = all(bool(torch.isfinite(r["loss_sum"])) for r in reports)
        res["frozen_vit_no_grad"] = all(p.grad is None for p in frozen)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for c in chunks:
        c.zero_grad(set_to_none=True)
        c.eval()
    hf.zero_grad(set_to_none=True)
    hf.eval()
    return res


def replace_labels(batch, labels):
    from dataclasses import replace

    return replace(batch, labels=labels)
