"""Rank functions for the parity tests: one launch per layout runs every check and returns numbers."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwenvl_mcore.parallel import ParallelLayout
from qwenvl_mcore.testing import parity, tiny

PACKED_KINDS = ("text", "image", "image_video")
PACKED_PAD = 7  # padding after the samples: an odd row, which sequence parallelism pads once more


def parity_checks(rank: int, world: int, layout_kwargs: dict, grads: bool, hf_overrides: dict | None = None, *,
                  packed: bool = False, cp_layouts: dict | None = None, vision_batch: bool = False) -> dict:
    """Forward reports (last pipeline stage only; None elsewhere), MRoPE equality (rank 0), and gradient reports
    (every stage: its own parameters); the aux-loss check too; with `packed`, the packed-row checks; with
    `vision_batch`, the batched-ViT checks (_vision_batch_checks.py) under out["vision_batch"]. Then, in the
    same processes, the context-parallel checks of each of `cp_layouts` (name -> layout kwargs; see
    _context_parallel_checks.cp_parity_checks) under out["cp"][name]."""
    layout = ParallelLayout(**layout_kwargs)
    parity.start(layout)
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer)
    hf = tiny.build_tiny_hf_model(tiny.tiny_hf_config(tokenizer, **(hf_overrides or {})), seed=0).eval()
    chunks, ctx = parity.build_pair(hf, layout)
    for c in chunks:
        c.eval()
    out = {"forward": {}, "rope": {}, "last_stage": parallel_state.is_pipeline_last_stage(),
           "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
           "num_layers": chunks[0].args.text.num_hidden_layers,
           "layers": [[layer.layer_number - 1 for layer in c.decoder.layers] for c in chunks]}
    for kind in tiny.SAMPLE_KINDS:
        batch = tiny.sample_inputs(processor, kind)
        out["forward"][kind] = parity.compare_forward(chunks, hf, batch)
        if rank == 0:
            ours = chunks[0].position_ids(parity.to_inputs(batch, labels=False))
            hf.model.rope_deltas = None
            ref, _ = hf.model.get_rope_index(
                batch["input_ids"], batch.get("mm_token_type_ids"), batch.get("image_grid_thw"),
                batch.get("video_grid_thw"), attention_mask=batch["attention_mask"])
            out["rope"][kind] = bool((ours == ref).all()) and ours.shape == ref.shape
    if grads:
        out["n_hf_params"] = len(list(hf.parameters()))
        out["grad"] = parity.compare_gradients(chunks, hf, tiny.sample_inputs(processor, "image_video"), ctx)
        out["grad_aux"] = parity.compare_gradients(chunks, hf, tiny.sample_inputs(processor, "padded_batch"), ctx,
                                                   aux_coef=0.5)
    if packed:
        out["packed"] = packed_checks(chunks, hf, processor)
    if vision_batch:
        from _vision_batch_checks import vision_batch_checks

        out["vision_batch"] = vision_batch_checks(chunks, hf, processor, layout)
    if cp_layouts:
        from _context_parallel_checks import cp_parity_checks

        out["cp"] = {name: cp_parity_checks(kwargs, processor, hf) for name, kwargs in cp_layouts.items()}
    return out


def parity_checks_in_turn(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    """parity_checks for each (layout_kwargs, grads, hf_overrides) in turn in one launch (megatron's parallel state
    started again for each layout): one start-up for several layouts of the same world size."""
    return [parity_checks(rank, world, *case) for case in cases]


def packed_checks(chunks, hf, processor) -> dict:
    """A packed row of PACKED_KINDS samples through megatron's schedule at this layout.

    Returns: per-sample losses of the packed row (last stage; None elsewhere) and transformers' loss of each sample
    alone; the worst relative difference between the gradients of the packed row's summed token losses and those of
    the samples' summed losses run as separate micro-batches (each stage its own parameters, sequence-parallel ones
    summed over TP); the routing statistics' assignments and tokens (whole model); and the (token, expert) pairs the
    experts received, summed over layers and ranks, for the packed row, the separate micro-batches and an
    all-padding row (padding routed nowhere: the first two are equal, the last is 0).
    """
    from qwenvl_mcore.data.collate import collate
    from qwenvl_mcore.data.packing import pack, rope_token_ids
    from qwenvl_mcore.data.synthetic import SyntheticConversations
    from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches

    model = chunks[0]
    args = model.args
    pad_id = processor.tokenizer.pad_token_id
    samples = [SyntheticConversations(processor, 1, kinds=(k,), seed=5, max_words=6)[0] for k in PACKED_KINDS]
    real = sum(len(s) for s in samples)
    capacity = real + PACKED_PAD
    row = pack(samples, capacity, pad_id, **rope_token_ids(args))
    alone = [collate([s], capacity, pad_id) for s in samples]  # one length for the pipeline
    res: dict = {"real_tokens": real, "top_k": args.text.num_experts_per_tok, "num_layers": args.text.num_hidden_layers}

    dispatched = []
    hooks = [layer.mlp.experts.register_forward_hook(lambda m, i, o: dispatched.append(int(i[1].sum())))
             for c in chunks for layer in c.decoder.layers]

    def world_dispatched() -> int:
        total = torch.tensor([float(sum(dispatched))])
        dispatched.clear()
        dist.all_reduce(total)
        return int(total.item())

    with torch.no_grad():
        tok = run_microbatches(chunks, [row], forward_only=True)
    bounds = list(zip(row.cu_seqlens[:-1].tolist(), row.cu_seqlens[1:].tolist()))
    res["packed_loss"] = ([float(tok[0][0, a:b].sum()) / s.num_loss_tokens for (a, b), s in zip(bounds, samples)]
                          if tok else None)
    res["hf_loss"] = []
    with torch.no_grad():
        for s in samples:
            ids = s.input_ids.unsqueeze(0)
            types = (ids == args.image_token_id).int() + 2 * (ids == args.video_token_id).int()
            hf.model.rope_deltas = None
            ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                     pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                     pixel_values_videos=s.pixel_values_videos, video_grid_thw=s.video_grid_thw,
                     labels=s.labels.unsqueeze(0), use_cache=False)
            res["hf_loss"].append(float(ref.loss))
    dispatched.clear()

    # Gradients of summed token losses (megatron's per-token mode: no division by tokens or micro-batches).
    configs = {id(c.config): c.config for c in chunks}.values()
    saved = [cfg.calculate_per_token_loss for cfg in configs]
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def run(microbatches) -> dict[str, torch.Tensor]:
        for c in chunks:
            c.train()
            c.aux_loss_coeff = 0.0
            c.zero_grad(set_to_none=True)
        run_microbatches(chunks, microbatches, forward_only=False, loss_for=loss_for_per_token)
        grads = {}
        for i, c in enumerate(chunks):
            for name, p in c.named_parameters():
                g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                if getattr(p, "sequence_parallel", False) and dist.get_world_size(tp_group) > 1:
                    dist.all_reduce(g, group=tp_group)
                grads[f"{i}.{name}"] = g
        return grads

    try:
        for cfg in configs:
            cfg.calculate_per_token_loss = True
        g_packed = run([row])
        totals = model.routing.micro[0].totals()
        e = args.text.num_experts
        res["routing_assignments"], res["routing_tokens"] = float(totals[:e].sum()), float(totals[2 * e])
        res["dispatched_packed"] = world_dispatched()
        g_alone = run(alone)
        res["dispatched_alone"] = world_dispatched()
    finally:
        for cfg, value in zip(configs, saved):
            cfg.calculate_per_token_loss = value
        for c in chunks:
            c.zero_grad(set_to_none=True)
            c.eval()
    rel = {n: float((g_packed[n] - g_alone[n]).abs().max() / g_alone[n].abs().max().clamp_min(1e-12))
           for n in g_packed}
    res["grad_rel"] = max(rel.values())
    res["grad_worst"] = max(rel, key=rel.get)
    res["grad_zero"] = [n for n in g_alone if float(g_alone[n].abs().max()) == 0.0]

    empty = pack([], capacity, pad_id, **rope_token_ids(args))
    with torch.no_grad():
        tok = run_microbatches(chunks, [empty], forward_only=True)
    res["empty_loss"] = float(tok[0].sum()) if tok else None
    res["empty_finite"] = bool(torch.isfinite(tok[0]).all()) if tok else None
    res["dispatched_empty"] = world_dispatched()
    for h in hooks:
        h.remove()
    return res
