"""Rank functions for the parity tests: one launch per layout runs every check and returns numbers."""

from __future__ import annotations

from megatron.core import parallel_state

from qwenvl_mcore.parallel import ParallelLayout
from qwenvl_mcore.testing import parity, tiny


def parity_checks(rank: int, world: int, layout_kwargs: dict, grads: bool, hf_overrides: dict | None = None) -> dict:
    """Forward reports (last pipeline stage only; None elsewhere), MRoPE equality (rank 0), and gradient reports
    (every stage: its own parameters); the aux-loss check too."""
    layout = ParallelLayout(**layout_kwargs)
    parity.start(layout)
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer)
    hf = tiny.build_tiny_hf_model(tiny.tiny_hf_config(tokenizer, **(hf_overrides or {})), seed=0).eval()
    chunks, ctx = parity.build_pair(hf, layout)
    for c in chunks:
        c.eval()
    out = {"forward": {}, "rope": {}, "last_stage": parallel_state.is_pipeline_last_stage()}
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
    return out
