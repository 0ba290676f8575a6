"""Rank function for tests/tools/test_lora_export.py: one launch trains a LoRA run (peft=lora) and exports its
checkpoint with `mcore2hf --adapter-only` (rank 0, the CLI), starts a run from that adapter (`peft.init_from`) and
runs the refusals of bad `peft.init_from` inputs, each before any step. Returns numbers and messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist

from qwenvl_mcore.lora.peft_io import gather_peft_tensors
from qwenvl_mcore.testing.runs import refusal, train_keeping_run
from qwenvl_mcore.training import config, trainer
from qwenvl_mcore.training.schedule import unwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3
LORA = ["peft=lora", "peft.rank=4", "peft.alpha=8.0", "peft.targets=[all,router]"]
COMMON = [
    "data.packing=false", "data.num_workers=0", "data.num_samples=8", "data.valid_samples=0",
    "data.global_batch_size=2", "data.seq_length=192", "optim.warmup_steps=0", "optim.weight_decay=0.0",
    "logging.progress_bar=false", "logging.tensorboard=false",
]
TP2_EP2 = ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"]
EP2 = ["parallel.tp=1", "parallel.ep=2", "parallel.sequence_parallel=false"]


def compose(run_dir: str, base: str, *extra, steps: int = STEPS, layout=TP2_EP2):
    return config.compose([*LORA, *COMMON, *layout, f"model.init_from={base}", f"trainer.dir={run_dir}",
                           f"trainer.steps={steps}", *extra])


def steps_logged(run_dir: str) -> int:
    path = os.path.join(run_dir, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(json.loads(line)["kind"] == "train" for line in f if line.strip())


def _adapters(run) -> dict[str, torch.Tensor]:
    """The run's adapters in peft's names and layout (global; collective)."""
    chunks = [unwrap(c) for c in run.chunks]
    targets = trainer.lora_training.lora_config(run.cfg).target_set()
    return {k: v.detach().cpu().clone() for k, v in gather_peft_tensors(chunks, run.args, targets=targets).items()}


def _bad_adapters(work: str, adapter: str) -> dict[str, str]:
    """Adapter directories that must be refused (rank 0 writes them): Llama-style names, a base_model_name_or_path
    whose config is another model, the tensors of a smaller model (one cut), and no adapter at all."""
    from safetensors.torch import load_file, save_file

    out = {}
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)

    def write(name, tensors, **fields):
        d = os.path.join(work, f"bad_{name}")
        os.makedirs(d)
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump({**cfg, **fields}, f)
        out[name] = d

    r, h = 4, 64
    write("llama", {f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight":
                    torch.zeros((r, h) if ab == "A" else (h, r)) for i in range(2) for p in "qv" for ab in "AB"},
          base_model_name_or_path="meta-llama/Llama-2-7b-hf", target_modules=["q_proj", "v_proj"],
          target_parameters=None)
    other = os.path.join(work, "llama_base")
    os.makedirs(other)
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, f)
    write("model_type", tensors, base_model_name_or_path=other)
    cut = dict(tensors)
    key = next(k for k in sorted(cut) if ".attn.qkv.lora_B." in k)
    cut[key] = cut[key][:-3].clone()
    write("shapes", cut)
    out["not_adapter"] = os.path.join(work, "not_an_adapter")
    os.makedirs(out["not_adapter"])
    with open(os.path.join(out["not_adapter"], "config.json"), "w") as f:
        json.dump({"model_type": "qwen3_vl_moe"}, f)
    return out


REFUSALS = {  # name: (overrides besides peft.init_from=<the named directory>)
    "rank": ("adapter", ["peft.rank=8"]),
    "alpha_targets": ("adapter", ["peft.alpha=16.0", "peft.targets=[attention]"]),
    "rslora": ("adapter", ["peft.rslora=true"]),
    "llama": ("llama", []),
    "model_type": ("model_type", []),
    "shapes": ("shapes", []),
    "not_adapter": ("not_adapter", []),
}


def export_checks(rank: int, world: int, work: str, base: str) -> dict:
    out: dict = {}
    trained = os.path.join(work, "trained")
    status, run = train_keeping_run(compose(trained, base, "optim.lr=2e-2", "optim.min_lr=2e-2"))
    out["trained_status"] = status
    out["trained"] = _adapters(run) if rank == 0 else None
    if rank != 0:
        _adapters(run)
    del run

    adapter = os.path.join(work, "adapter")
    if rank == 0:  # the CLI, on the trainer.dir (its checkpoints/latest)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools/convert/mcore2hf.py"), "--mcore", trained,
                               "--out", adapter, "--adapter-only", "--no-progress"],
                              capture_output=True, text=True, timeout=600)
        out["export"] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        bad = _bad_adapters(work, adapter) if proc.returncode == 0 else {}
    else:
        bad = None
    box = [bad]
    dist.broadcast_object_list(box, src=0)
    bad = box[0]
    if not bad:
        return out
    bad["adapter"] = adapter

    # start from the exported adapter at another layout; lr 0, so the one step leaves the adapters as loaded
    imported = os.path.join(work, "imported")
    status, run = train_keeping_run(compose(imported, base, f"peft.init_from={adapter}", "optim.lr=0.0",
                                             "optim.min_lr=0.0", steps=1, layout=EP2))
    out["imported_status"] = status
    out["imported"] = _adapters(run)
    out["imported_steps"] = steps_logged(imported)
    del run

    # resumed with another peft.init_from: ignored, the checkpoint wins (the run is complete: nothing to do)
    out["resume_ignores_init_from"] = refusal(lambda: trainer.train(compose(
        imported, base, f"peft.init_from={bad['not_adapter']}", "optim.lr=0.0", "optim.min_lr=0.0", steps=1,
        layout=EP2)))

    for name, (directory, extra) in REFUSALS.items():
        run_dir = os.path.join(work, f"refused_{name}")
        cfg = compose(run_dir, base, f"peft.init_from={bad[directory]}", *extra, layout=EP2)
        out[f"{name}_error"] = refusal(lambda: trainer.train(cfg))
        out[f"{name}_steps"] = steps_logged(run_dir)
    if rank == 0:
        shutil.rmtree(os.path.join(work, "llama_base"), ignore_errors=True)
    return out
