"""Rank function for the converter tests: load a converted checkpoint at a parallel layout, check the weights
against the HF files and the logits against transformers, then save it again through the trainer's save path."""

from __future__ import annotations

import os

import torch

from qwenvl_mcore.checkpoint import manager, model_io
from qwenvl_mcore.conversion import engine
from qwenvl_mcore.conversion.hf_io import SafetensorsReader
from qwenvl_mcore.conversion.transforms import RELEASED
from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, load_hf_config
from qwenvl_mcore.models.qwen3_vl_moe.hf_mapping import Context
from qwenvl_mcore.models.qwen3_vl_moe.model import build_model_chunks
from qwenvl_mcore.parallel import ParallelLayout, init_distributed
from qwenvl_mcore.testing import parity, tiny


def load_check_save(rank: int, world: int, layout_kwargs: dict, hf_dir: str, mcore_dir: str, save_root: str):
    """Weights equal to the released HF files bit for bit (every rank, its own stage), logit report (last stage),
    and a save at step 3 through checkpoint.manager."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    layout = ParallelLayout(**layout_kwargs)
    init_distributed(layout)
    args = args_from_hf_config(load_hf_config(hf_dir))
    chunks = build_model_chunks(args, layout, dtype=torch.float32)
    model_io.load_model(mcore_dir, chunks)
    reader = SafetensorsReader(hf_dir)
    unequal, compared = [], []
    for chunk in chunks:
        for name, tensor in engine.gather_hf_tensors(chunk, Context(args, expert_layout=RELEASED)).items():
            compared.append(name)
            if not torch.equal(tensor, reader.get(name)):
                unequal.append(name)
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    processor = tiny.build_processor(tiny.build_tokenizer())
    for c in chunks:
        c.eval()
    report = parity.compare_forward(chunks, hf, tiny.sample_inputs(processor, "image_video"))
    manager.save_checkpoint(save_root, 3, model_io.model_sharded_state_dict(chunks),
                            hf_dir=os.path.join(mcore_dir, model_io.HF_SUBDIR), dtype=torch.float32)
    return {"unequal": unequal, "compared": compared, "forward": report}
