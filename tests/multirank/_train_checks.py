"""Rank functions for the training-step tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config
from qwenvl_mcore.models.qwen3_vl_moe.model import build_model_chunks
from qwenvl_mcore.parallel import ParallelLayout, init_distributed
from qwenvl_mcore.testing import parity, tiny
from qwenvl_mcore.training.setup import OptimSettings, build_optimizer, wrap_ddp
from qwenvl_mcore.training.step import train_step


def _replicas_differ(chunks) -> list[str]:
    """Parameters whose data-parallel replicas differ (experts: over expert-data-parallel ranks)."""
    differ = []
    for c in chunks:
        for name, p in c.named_parameters():
            group = (parallel_state.get_expert_data_parallel_group() if ".mlp.experts." in name
                     else parallel_state.get_data_parallel_group())
            parts = [torch.empty_like(p) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, p.detach().contiguous(), group=group)
            if not all(torch.equal(parts[0], q) for q in parts[1:]):
                differ.append(name)
    return differ


def overfit(rank: int, world: int, layout_kwargs: dict, steps: int) -> dict:
    """`steps` optimizer steps on one fixed global batch (two image + video micro-batches per rank); the
    per-step results of this rank, and the parameters whose DP replicas differ at initialisation and at the end."""
    layout = ParallelLayout(**layout_kwargs)
    init_distributed(layout, seed=1)
    processor = tiny.build_processor(tiny.build_tokenizer())
    args = args_from_hf_config(tiny.tiny_hf_config())
    chunks = wrap_ddp(build_model_chunks(args, layout, dtype=torch.float32), distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(chunks, OptimSettings(lr=3e-3, warmup_steps=2), steps=steps)
    microbatches = [parity.to_inputs(tiny.sample_inputs(processor, kind)) for kind in ("image_video", "image_video")]
    differ_at_init = _replicas_differ(chunks)
    results = []
    for _ in range(steps):
        for c in chunks:
            c.train()
        r = train_step(chunks, optimizer, microbatches)
        scheduler.step(1)
        results.append(dict(loss=r.loss, tokens=r.tokens, grad_norm=r.grad_norm, skipped=r.skipped))
    return {"steps": results, "differ_at_init": differ_at_init, "differ_at_end": _replicas_differ(chunks)}
