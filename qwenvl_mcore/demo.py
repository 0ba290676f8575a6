"""The main job on its embedded default, on the CPU: the whole path a user takes on a cluster, at tiny size.

1. a tiny Qwen3-VL MoE in HF format (random weights, local tokenizer and processor) and a small multimodal SFT
   dataset (images, MP4 and frame-list videos in four file formats), both made locally;
2. HF -> megatron conversion (tools/convert/hf2mcore.py);
3. training at TP2 x EP2 (sequence parallel) on 4 CPU ranks through launch/local.sh, the launcher code path of
   the Slurm jobs, with checkpoints;
4. export back to HF (tools/convert/mcore2hf.py), loaded in transformers, which generates from an image prompt;
5. a summary: loss first -> last, tokens/s, where every output is.

    python -m qwenvl_mcore.demo [--out runs/demo] [--steps 30] [--samples 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".qwenvl_mcore_demo"  # in every directory the demo makes: the only kind it ever replaces


def claim_output(out: Path) -> None:
    """Make `out` an empty demo directory. An existing one is replaced only if a previous demo made it (its
    marker) or it is empty; the checkout and its parents are never used. SystemExit with an error otherwise."""
    out = out.resolve()
    if out == ROOT or out in ROOT.parents:
        raise SystemExit(f"error: --out {out} is the checkout or contains it; choose a directory of its own, such "
                         "as runs/demo.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise SystemExit(f"error: --out {out} exists and is not a previous demo output (no {MARKER}); nothing "
                             "was deleted. Choose another --out, or empty it yourself.")
        shutil.rmtree(out)
    elif out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} exists and is not a directory; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m qwenvl_mcore.demo; replaced by the next demo run\n")


def _run(what: str, cmd: list[str], log: Path) -> None:
    """Run one stage, its output in `log`; on failure show the end of it and stop."""
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"[demo] {what} failed (exit {proc.returncode}); full log: {log}")
    print(f"[demo] {what}: {time.time() - start:.0f}s (log {log})", flush=True)


def generate(export: Path, image: Path, max_new_tokens: int = 16) -> str:
    """Greedy generation of the exported model in transformers for one image question."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    processor = AutoProcessor.from_pretrained(export)
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, images=[Image.open(image).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo"),
                        help="everything goes here (an earlier demo output there is replaced; anything else is refused)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=64)
    opts = parser.parse_args(argv)
    from qwenvl_mcore import library_noise

    library_noise.install()  # the tiny model's build loads megatron: its known notices stay off the console
    from qwenvl_mcore.data.sample_data import write_sample_dataset
    from qwenvl_mcore.models.qwen3_vl_moe.debug_checkpoint import save_tiny_hf_checkpoint

    t0 = time.time()
    out = Path(opts.out).resolve()
    claim_output(out)
    hf = save_tiny_hf_checkpoint(out / "hf", seed=0)
    manifest = write_sample_dataset(out / "data", num_samples=opts.samples, seed=0)
    files = [str(out / "data" / f) for f in manifest["files"]]
    print(f"[demo] tiny Qwen3-VL MoE in HF format: {hf}; {manifest['num_records']['total']} conversations in "
          f"{len(files)} files: {out / 'data'}", flush=True)
    py = sys.executable
    _run("HF -> megatron conversion", [py, "tools/convert/hf2mcore.py", "--hf", str(hf), "--out", str(out / "mcore")],
         out / "convert.log")
    run_dir = out / "run"
    _run(f"training, {opts.steps} steps at TP2 x EP2 on 4 CPU ranks",
         ["bash", "launch/local.sh", "--nproc", "4", "experiment=debug_cpu_tp2_ep2", f"model.init_from={out / 'mcore'}",
          f"data.train=[{','.join(files)}]", "data.seq_length=512", "data.global_batch_size=8",
          f"trainer.steps={opts.steps}", f"trainer.dir={run_dir}", "trainer.eval_every=0",
          f"checkpoint.every={max(opts.steps // 3, 1)}", "logging.progress_bar=false"], out / "train.log")
    export = out / "export"
    _run("megatron -> HF export", [py, "tools/convert/mcore2hf.py", "--mcore", str(run_dir / "checkpoints"),
                                   "--out", str(export)], out / "export.log")
    image = out / "data" / sorted(p for p, m in manifest["media"].items() if m["type"] == "image")[0]
    answer = generate(export, image)
    steps = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if m["kind"] == "train"]
    tokens_per_s = sum(m["tokens"] for m in steps[1:]) / max(sum(m["step_time_s"] for m in steps[1:]), 1e-9)
    print(f"[demo] transformers loads the export and answers {image.name!r}: {answer!r}")
    print(f"[demo] loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f} over {len(steps)} steps; "
          f"{tokens_per_s:.0f} tokens/s on 4 CPU ranks; skipped samples: {steps[-1]['data_skips'] or 'none'}")
    print(f"[demo] outputs: HF model {hf} | data {out / 'data'} | megatron checkpoint {out / 'mcore'} | run "
          f"{run_dir} (checkpoints/, logs/metrics.jsonl, logs/ tensorboard) | export {export}")
    print(f"[demo] done in {time.time() - t0:.0f}s")
    return 0 if steps[-1]["loss"] < steps[0]["loss"] else 1


if __name__ == "__main__":
    sys.exit(main())
