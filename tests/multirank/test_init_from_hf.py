"""model.init_from=<HF directory> and checkpoint.save_hf, through the trainer's entry point (torchrun, 4 CPU ranks),
next to tests/multirank/test_trainer.py's runs from the converted checkpoint of the same HF directory (its launch
machinery and its straight runs are reused: in one pytest session they run once for both files).

- 6 steps from the HF directory (released expert layout) at TP2xEP2 (SP) and at PP2xDP2, and from the same
  weights saved in the transformers-5 expert layout at TP2xEP2 (experts sharded by EP; conversion from that
  layout at other layouts: tests/tools/test_convert.py), give every loss, grad norm and aux loss of the run from
  the converted checkpoint bit for bit;
- checkpoint.save_hf=every at TP2xEP2 and at PP2 (one writer per pipeline stage, several shards; PP2 with
  checkpoint.async_save=true, whose periodic save exports before training goes on): each exported
  <step dir>/hf loads in transformers and its logits equal our model's loaded from that step's checkpoint (1e-5,
  fp32); the step directory carries config, index and processor files.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

import test_trainer as tt
from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.dist import run_on_ranks

from _hf_export_checks import hf_vs_checkpoint

SHARD = "120KB"  # several shards per export (the tiny model holds about 1 MB)
STEPS, EVERY = 6, 3  # steps of each run from the HF directory; checkpoint (and HF export) every EVERY steps


@functools.cache
def hf5_dir():
    """The weights of test_trainer's HF directory (seed 0) saved in transformers 5's own expert layout."""
    return tiny.save_tiny_hf_checkpoint(tt.WORK / "hf_transformers5", seed=0, expert_layout="transformers5")


def _overrides(extra: list[str]) -> list[str]:
    keys = {e.split("=", 1)[0] for e in extra}
    return [c for c in tt.COMMON if c.split("=", 1)[0] not in keys] + extra


@functools.cache
def from_hf(name: str, layout_name: str) -> list[dict]:
    """STEPS steps at `layout_name` from an HF directory: `name` "hf" (released layout, save_hf=every with a save
    every EVERY steps) or "hf5" (transformers-5 layout)."""
    hf, _ = tt.hf_and_mcore()
    source = hf if name == "hf" else hf5_dir()
    extra = [f"model.init_from={source}"]
    if name == "hf":
        extra += [f"checkpoint.every={EVERY}", "checkpoint.save_hf=every", f"checkpoint.hf_max_shard_size={SHARD}"]
        if layout_name == "pp2":  # the periodic save through the asynchronous saver, the last one sync
            extra.append("checkpoint.async_save=true")
    world, layout = tt.LAYOUTS[layout_name]
    run_dir = tt.WORK / f"{name}_{layout_name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m",
           "qwenvl_mcore.train", *_overrides(extra), *layout, f"trainer.dir={run_dir}", f"trainer.steps={STEPS}"]
    proc = subprocess.run(cmd, cwd=tt.ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tt.metrics(run_dir)


@pytest.mark.parametrize("name,layout_name", [("hf", "tp2_ep2"), ("hf", "pp2"), ("hf5", "tp2_ep2")])
def test_run_from_hf_dir_equals_run_from_its_converted_checkpoint(name, layout_name):
    ref = tt.straight(layout_name, tt.STEPS)[:STEPS]  # test_trainer runs these (tt.STEPS steps)
    ours = from_hf(name, layout_name)
    assert len(ours) == len(ref) == STEPS and not any(m["skipped"] for m in ours)
    for key in ("loss", "grad_norm", "aux_loss", "sample_ids", "lr"):
        assert [m[key] for m in ours] == [m[key] for m in ref], key


def test_save_hf_every_loads_in_transformers_with_our_logits():
    from qwenvl_mcore.conversion.hf_io import scan_hf_dir

    pairs = []
    for layout_name in ("tp2_ep2", "pp2"):
        from_hf("hf", layout_name)
        ckpts = tt.WORK / f"hf_{layout_name}" / "checkpoints"
        for step in (EVERY, STEPS):
            step_dir = ckpts / f"step_{step:07d}"
            hf = step_dir / "hf"
            index = json.loads((hf / "model.safetensors.index.json").read_text())
            shards = sorted(set(index["weight_map"].values()))
            assert len(shards) > 2 and all((hf / s).is_file() for s in shards)
            for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
                assert (hf / name).is_file(), name
            infos = scan_hf_dir(hf)
            gate_up = infos["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape
            config = json.loads((hf / "config.json").read_text())["text_config"]
            assert gate_up == (config["num_experts"], config["hidden_size"], 2 * config["moe_intermediate_size"])
            pairs.append((str(hf), str(step_dir)))
    reports = run_on_ranks(hf_vs_checkpoint, 1, pairs)[0]  # one process for the four
    for (hf, _), report in zip(pairs, reports, strict=True):
        assert report["max_abs_logit_diff"] <= 1e-5 and report["top1_agreement"] == 1.0, (hf, report)
