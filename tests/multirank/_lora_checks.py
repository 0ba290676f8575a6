"""Rank functions for the LoRA tests: one launch per layout runs every check and returns numbers.

The reference is transformers' Qwen3VLMoeForConditionalGeneration with a peft adapter loaded through
`PeftModel.from_pretrained`; the adapter is drawn in peft (random, B non-zero), saved, and loaded into our model
through qwenvl_mcore.lora.peft_io, so the test also checks the name and layout mapping.
"""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from qwenvl_mcore.lora import LoRAConfig
from qwenvl_mcore.lora.apply import adapter_parameters, apply_lora
from qwenvl_mcore.lora.peft_io import PEFT_PREFIX, gather_peft_tensors, load_peft_tensors, peft_config_fields, \
    strip_adapter_name
from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config
from qwenvl_mcore.parallel import ParallelLayout
from qwenvl_mcore.testing import parity, tiny
from qwenvl_mcore.training.schedule import loss_for_per_token, run_microbatches

# Every target kind; peft expresses them all (the experts and the router through target_parameters).
LORA = dict(method="lora", rank=4, alpha=8.0, targets=["all", "router"])
FORWARD_KINDS = ("text", "image", "video")
GRAD_KIND = "image_video"  # reaches every adapter: ViT, mergers, DeepStack, attention, experts, router


def _peft_adapter(hf, cfg: LoRAConfig, out_dir: str, seed: int = 7):
    """Wrap `hf` with a peft LoRA of `cfg`, draw every A ~ N(0, 1/in) and B ~ N(0, 0.25/r) (seeded, in name order),
    save it to `out_dir` and return the peft model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf, LoraConfig(**peft_config_fields(cfg), init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / cfg.rank ** 0.5)
    model.save_pretrained(out_dir)
    return model


def _reference(hf_config, adapter_dir: str):
    """A fresh transformers model (the same seeded weights) with the saved adapter, via PeftModel.from_pretrained."""
    from peft import PeftModel

    hf = tiny.build_tiny_hf_model(hf_config, seed=0).eval()
    return PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True)


def sharded_mismatch(chunks) -> list[str]:
    """Adapters whose ShardedTensor in the model's sharded_state_dict (what a distributed checkpoint stores) is
    missing or does not have the global shape that the parity-checked gather (peft_io) gives."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from qwenvl_mcore.conversion import engine
    from qwenvl_mcore.lora.apply import _global_shape

    bad = []
    for c in chunks:
        stored = {id(v.data): v for v in c.sharded_state_dict().values() if isinstance(v, ShardedTensor)}
        for n, p in c.named_parameters():
            if getattr(p, "lora", False):
                st = stored.get(id(p))
                if st is None or list(st.global_shape[-p.dim():]) != _global_shape(engine.global_name(c, n), p):
                    bad.append(n)
    return bad


def lora_parity_checks(rank: int, world: int, layout_kwargs: dict, *, subset: bool = False,
                       train: bool = True, grouped_gemm: bool | None = None, lora: dict | None = None,
                       export_dir: str | None = None, packed: bool = False) -> dict:
    """Logits (FORWARD_KINDS) and every adapter gradient (GRAD_KIND) of our model with a peft adapter loaded
    against transformers + the same adapter through peft; the round trip of the adapter tensors; with `train`, a
    few frozen-base optimizer steps; with `subset`, subset_checks; with `packed`, the parity tests' packed-row
    checks (_parity_checks.packed_checks) with the adapters in both models. `grouped_gemm` forces the experts'
    grouped GEMM (True) or loop (False) path, adapters included (None: the default, the loop on the CPU). `lora`:
    settings over LORA (rsLoRA, alpha)."""
    layout = ParallelLayout(**layout_kwargs)
    parity.start(layout)
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer)
    hf_config = tiny.tiny_hf_config(tokenizer)
    hf = tiny.build_tiny_hf_model(hf_config, seed=0).eval()
    out: dict = {"subset": subset_checks(hf, layout, processor) if subset else None}
    chunks, _ = parity.build_pair(hf, layout)
    for c in chunks:
        for layer in c.decoder.layers:
            layer.mlp.experts.grouped_gemm = grouped_gemm
    args = args_from_hf_config(hf.config)
    cfg = LoRAConfig(**(LORA | (lora or {})))
    adapters = apply_lora(chunks, cfg)
    # apply_lora's own init (A drawn per global tensor, B = 0): the same global tensors at every layout
    out["init_sums"] = {k: float(v.double().sum()) for k, v in gather_peft_tensors(chunks, args).items()}
    out.update(last_stage=parallel_state.is_pipeline_last_stage(), n_adapters=len(adapters),
               sharded_mismatch=sharded_mismatch(chunks))
    with tempfile.TemporaryDirectory() as tmp:
        drawn = _peft_adapter(hf, cfg, tmp)
        saved = {strip_adapter_name(k): v.detach().clone() for k, v in drawn.named_parameters() if ".lora_" in k}
        from safetensors.torch import load_file

        file_tensors = load_file(f"{tmp}/adapter_model.safetensors")
        load_peft_tensors(chunks, args, file_tensors)
        ref = _reference(hf_config, tmp)
    out["peft_tensors"] = len(file_tensors)
    # our tensors back in peft's names and layout equal what peft drew (bit for bit)
    back = gather_peft_tensors(chunks, args, targets=cfg.target_set())
    out["peft_keys_equal"] = set(saved) == set(file_tensors)
    out["roundtrip_keys"] = sorted(back)  # this stage's; the stages together must give every key
    out["roundtrip_max_diff"] = max((back[k] - saved[k]).abs().max().item() for k in back)
    out["ref_frozen_base"] = all(not p.requires_grad for n, p in ref.named_parameters() if ".lora_" not in n)

    base = ref.get_base_model()
    for c in chunks:
        c.eval()
    out["forward"] = {kind: parity.compare_forward(chunks, base, tiny.sample_inputs(processor, kind))
                      for kind in FORWARD_KINDS}
    # the adapters change the model (B non-zero): our logits without them differ
    out["adapter_effect"] = _adapter_effect(chunks, tiny.sample_inputs(processor, "image"))
    if packed:
        from _parity_checks import packed_checks

        out["packed"] = packed_checks(chunks, base, processor)

    batch = tiny.sample_inputs(processor, GRAD_KIND)
    for m in (*chunks, base):
        m.train()
        m.zero_grad(set_to_none=True)
    for c in chunks:
        c.aux_loss_coeff = 0.0
    parity.hf_forward(base, batch).loss.backward()
    run_microbatches(chunks, [parity.to_inputs(batch)], forward_only=False, loss_for=loss_for_per_token)
    parity.reduce_grads_of_identical_batches(chunks)
    ours = gather_peft_tensors(chunks, args, source="grad", targets=cfg.target_set())
    theirs = {PEFT_PREFIX + strip_adapter_name(n): p.grad for n, p in base.named_parameters() if ".lora_" in n}
    out["n_peft_params"] = len(theirs)
    out["grad_compared"] = sorted(ours)  # this stage's adapters; every name must be one of peft's
    out["grad_rel"], out["grad_worst"] = parity.worst_relative(ours, theirs)
    out["grad_zero"] = sorted(k for k, g in ours.items() if g.abs().max().item() == 0.0)
    out["base_grads"] = sorted(n for c in chunks for n, p in c.named_parameters()
                               if p.grad is not None and not getattr(p, "lora", False))
    for c in chunks:
        c.zero_grad(set_to_none=True)
    out["train"] = frozen_training(chunks, processor) if train else None
    if train and export_dir:
        out["export"] = export_checks(chunks, args, cfg, hf_config, processor, export_dir)
    return out


def export_checks(chunks, args, cfg, hf_config, processor, out_dir: str) -> dict:
    """Our trained adapters written by save_peft_adapter (no peft involved), loaded by PeftModel.from_pretrained:
    logits against ours on an image batch, and the file's tensors against ours (bit for bit)."""
    from safetensors.torch import load_file

    from qwenvl_mcore.lora.peft_io import save_peft_adapter

    save_peft_adapter(chunks, args, cfg, out_dir)
    dist.barrier()
    for c in chunks:
        c.eval()
    ref = _reference(hf_config, out_dir).get_base_model().eval()
    ours = gather_peft_tensors(chunks, args, targets=cfg.target_set())
    written = load_file(f"{out_dir}/adapter_model.safetensors")
    return {
        "forward": parity.compare_forward(chunks, ref, tiny.sample_inputs(processor, "image")),
        "tensors_equal": all(torch.equal(written[k], v) for k, v in ours.items()),
        "n_written": len(written),
    }


def frozen_training(chunks, processor, steps: int = 3) -> dict:
    """`steps` optimizer steps of the project's own setup (megatron DDP, distributed Adam with fp32 master weights,
    train_step) on one image batch: losses, whether every base tensor is bit-identical afterwards, the base tensors
    that got a gradient buffer, and whether every adapter moved."""
    from qwenvl_mcore.training.setup import OptimSettings, build_optimizer, wrap_ddp
    from qwenvl_mcore.training.step import train_step

    for c in chunks:
        c.train()
    base = {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()
            if not getattr(p, "lora", False)}
    lora = {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()
            if getattr(p, "lora", False)}
    wrapped = wrap_ddp(chunks, distributed_optimizer=True)
    optimizer, scheduler = build_optimizer(wrapped, OptimSettings(lr=2e-3, schedule="constant", clip_grad=0.0),
                                           steps=steps)
    batch = parity.to_inputs(tiny.sample_inputs(processor, "image"))
    losses = []
    for _ in range(steps):
        result = train_step(wrapped, optimizer, [batch])
        scheduler.step(1)
        losses.append(result.loss)
    now = {f"{i}.{n}": p.detach() for i, c in enumerate(chunks) for n, p in c.named_parameters()}
    return {
        "losses": losses,
        "base_changed": sorted(n for n, t in base.items() if not torch.equal(t, now[n])),
        "base_with_grad_buffer": sorted(n for i, c in enumerate(chunks) for n, p in c.named_parameters()
                                        if not getattr(p, "lora", False) and
                                        (p.requires_grad or getattr(p, "main_grad", None) is not None)),
        "lora_unchanged": sorted(n for n, t in lora.items() if torch.equal(t, now[n])),
        "n_base": len(base),
    }


def subset_checks(hf, layout, processor) -> dict:
    """apply_lora with a few targets: which adapters exist, and that B = 0 leaves the logits bit-identical."""
    chunks, _ = parity.build_pair(hf, layout)
    for c in chunks:
        c.eval()
    inputs = [parity.to_inputs(tiny.sample_inputs(processor, "image"), labels=False)]
    with torch.no_grad():
        before = run_microbatches(chunks, inputs, forward_only=True)
    adapters = apply_lora(chunks, LoRAConfig(method="lora", rank=2, alpha=4.0, targets=["k", "experts_down",
                                                                                        "merger_fc2"]))
    with torch.no_grad():
        after = run_microbatches(chunks, inputs, forward_only=True)
    return {
        "adapters": sorted(n for n, _ in adapters),
        "trainable": sorted(n for c in chunks for n, p in c.named_parameters() if p.requires_grad),
        "zero_b_logits_equal": bool(torch.equal(before[0], after[0])) if before else None,
        "adapter_params": sorted(n for n, _ in adapter_parameters(chunks)),
    }


def _adapter_effect(chunks, batch) -> float | None:
    """max |logit difference| of our model with its adapters vs with every B zeroed (restored after); None off the
    last pipeline stage."""
    b_params = [p for c in chunks for n, p in c.named_parameters() if getattr(p, "lora", False) and ".lora_B." in n]
    inputs = [parity.to_inputs(batch, labels=False)]
    with torch.no_grad():
        with_b = run_microbatches(chunks, inputs, forward_only=True)
        saved = [p.detach().clone() for p in b_params]
        for p in b_params:
            p.zero_()
        without_b = run_microbatches(chunks, inputs, forward_only=True)
        for p, s in zip(b_params, saved):
            p.copy_(s)
    if not with_b:
        return None
    return (parity.gather_vocab(with_b[0]) - parity.gather_vocab(without_b[0])).abs().max().item()
