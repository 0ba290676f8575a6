"""Rank functions for the parity tests: one launch per layout runs every check and returns numbers."""

from __future__ import annotations

from qwenvl_mcore.parallel import ParallelLayout
from qwenvl_mcore.testing import parity, tiny
from qwenvl_mcore.models.qwen3_vl_moe.rope import get_rope_index


def parity_checks(rank: int, world: int, layout_kwargs: dict, grads: bool) -> dict:
    layout = ParallelLayout(**layout_kwargs)
    parity.start(layout)
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer)
    hf = tiny.build_tiny_hf_model(tiny.tiny_hf_config(tokenizer), seed=0).eval()
    model, ctx = parity.build_pair(hf, layout)
    model.eval()
    out = {"forward": {}, "rope": {}}
    for kind in tiny.SAMPLE_KINDS:
        batch = tiny.sample_inputs(processor, kind)
        out["forward"][kind] = parity.compare_forward(model, hf, batch)
        if rank == 0:
            ours = model.position_ids(parity.to_inputs(batch, labels=False))
            hf.model.rope_deltas = None
            ref, _ = hf.model.get_rope_index(
                batch["input_ids"], batch.get("mm_token_type_ids"), batch.get("image_grid_thw"),
                batch.get("video_grid_thw"), attention_mask=batch["attention_mask"])
            out["rope"][kind] = bool((ours == ref).all()) and ours.shape == ref.shape
    if grads:
        batch = tiny.sample_inputs(processor, "image_video")
        out["grad"] = parity.compare_gradients(model, hf, batch, ctx)
        out["grad_aux"] = parity.compare_gradients(model, hf, tiny.sample_inputs(processor, "padded_batch"), ctx,
                                                   aux_coef=0.5)
    return out
