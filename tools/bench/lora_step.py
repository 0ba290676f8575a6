"""What LoRA costs over the frozen forward and backward: one decoder layer of a released model at its real widths.

    python tools/bench/lora_step.py [--flavor qwen3_vl_30b_a3b] [--tokens 1024] [--rank 16] [--dtype fp32]
        [--device cpu] [--warmup 1] [--iters 3] [--json out.json]

One decoder layer (attention + 128 routed experts, top-8, the flavor's widths; the vocabulary and the ViT are shrunk,
they are not timed) on a packed row of `--tokens` tokens, forward + backward, three ways:
- full: every weight trains (weight and input gradients), what full fine-tuning runs;
- frozen: no weight trains, only the input gradient flows back (what a LoRA step must run anyway: the layers
  below need it);
- lora: the base frozen with adapters of rank `--rank` on q, k, v, o and every expert's gate/up and down
  (`qwenvl_mcore.lora`, the trainer's `peft=lora`), the expert adapters as grouped GEMMs like their base.
each with the experts as one grouped GEMM (`torch.nn.functional.grouped_mm`) and as a loop over experts (the model's
default on the CPU). Printed: median and best seconds per forward + backward, and lora / frozen, lora / full of the
best times (the least disturbed by other work on the machine). The table is the last thing printed; --json writes
every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment, start_single_process, time_call  # noqa: E402

from qwenvl_mcore.lora.config import LoRAConfig  # noqa: E402
from qwenvl_mcore.lora.training import prepare  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config  # noqa: E402
from qwenvl_mcore.models.qwen3_vl_moe.model import build_model_chunks  # noqa: E402
from qwenvl_mcore.parallel import ParallelLayout  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def one_layer_config(flavor: str) -> dict:
    """The flavor's HF config with one LLM layer, a 1,024-token vocabulary and a one-block ViT (neither timed)."""
    cfg = copy.deepcopy(flavor_hf_config(flavor))
    cfg["text_config"].update(num_hidden_layers=1, vocab_size=1024)
    cfg["vision_config"].update(depth=1, deepstack_visual_indexes=[0])
    return cfg


def layer_step(model, tokens: int, dtype, device, generator):
    """A function running one forward + backward of the model's only decoder layer on a fixed random input."""
    h = model.config.hidden_size
    x = (torch.randn(tokens, 1, h, generator=generator) * 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    rotary = model.rotary(torch.arange(tokens, device=device).view(1, 1, tokens).expand(3, 1, tokens))
    layer = model.decoder.layers[0]

    def step():
        out = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        x.grad = None
        for p in model.parameters():
            p.grad = None
    return step


def set_grouped(model, grouped: bool) -> None:
    model.decoder.layers[0].mlp.experts.grouped_gemm = grouped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="qwen3_vl_30b_a3b")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="timed rounds (each runs every variant once)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    start_single_process()
    args = args_from_hf_config(one_layer_config(a.flavor))
    torch.manual_seed(0)
    base = build_model_chunks(args, ParallelLayout(), dtype=dtype)[0].to(device)
    torch.manual_seed(0)
    lora = build_model_chunks(args, ParallelLayout(), dtype=dtype)[0].to(device)
    adapters = prepare([lora], LoRAConfig(method="lora", rank=a.rank, targets=["attention", "experts"]))
    for _, param in adapters:  # B off zero, as after a few steps
        torch.nn.init.normal_(param, std=0.01)
    layer_adapters = sum(param.numel() for name, param in adapters if "decoder.layers.0." in name)
    steps = {"full": layer_step(base, a.tokens, dtype, device, torch.Generator().manual_seed(0)),
             "lora": layer_step(lora, a.tokens, dtype, device, torch.Generator().manual_seed(0))}

    def run(name: str, grouped: bool) -> float:
        """One timed forward + backward; `frozen` is the base model with requires_grad off for the call."""
        model = lora if name == "lora" else base
        set_grouped(model, grouped)
        for param in base.parameters():
            param.requires_grad_(name == "full")
        return time_call(steps["lora" if name == "lora" else "full"], device, warmup=0, iters=1)["min_s"]

    # Round robin, so that other work on the machine slows every variant alike; the best of each is reported.
    variants = [(name, grouped) for name in ("full", "frozen", "lora") for grouped in (True, False)]
    for name, grouped in variants * a.warmup:
        run(name, grouped)
    times: dict[str, list[float]] = {f"{n}/{'grouped' if g else 'loop'}": [] for n, g in variants}
    for i in range(a.iters):
        for name, grouped in variants:
            times[f"{name}/{'grouped' if grouped else 'loop'}"].append(run(name, grouped))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()), flush=True)
    results = {k: {"median_s": statistics.median(v), "min_s": min(v), "iters": len(v), "all_s": v}
               for k, v in times.items()}

    env = environment(device)
    print(f"\n{a.flavor}, one decoder layer, {a.tokens} tokens, {a.dtype} on {env.get('device', device)}; "
          f"LoRA rank {a.rank} on q k v o + experts ({layer_adapters:,} adapter elements in the layer); "
          f"seconds per forward + backward, median (best) of {a.iters}; ratios of the best\n")
    print("| experts | full | frozen | lora | lora / frozen | lora / full |")
    print("|---|---|---|---|---|---|")
    for impl in ("grouped", "loop"):
        f, z, lo = (results[f"{n}/{impl}"] for n in ("full", "frozen", "lora"))
        print(f"| {impl} | {f['median_s']:.3f} ({f['min_s']:.3f}) | {z['median_s']:.3f} ({z['min_s']:.3f}) | "
              f"{lo['median_s']:.3f} ({lo['min_s']:.3f}) | {lo['min_s'] / z['min_s']:.2f} | "
              f"{lo['min_s'] / f['min_s']:.2f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "environment": env, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
