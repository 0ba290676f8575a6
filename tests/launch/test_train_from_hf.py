"""`python -m qwenvl_mcore.train` (one rank, no torchrun) straight from an HF directory whose shape is none of the
flavors (3 layers, 6 experts), with checkpoint.save_hf=final: killed while the HF weights are half written it leaves
no directory that looks complete (and no `latest`); the same command again removes the leftover, trains, and its
<step dir>/hf loads in transformers with our model's logits (1e-5, fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "multirank"))  # the rank function below, importable by spawned ranks too

from _hf_export_checks import hf_vs_checkpoint  # noqa: E402

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                      "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def _looks_complete(d: Path) -> bool:
    """An HF model directory a loader would take: config.json and every weight file its index names."""
    index = d / "model.safetensors.index.json"
    if not (d / "config.json").is_file():
        return False
    if (d / "model.safetensors").is_file():
        return True
    if not index.is_file():
        return False
    return all((d / f).is_file() for f in set(json.loads(index.read_text())["weight_map"].values()))


def test_one_rank_from_hf_dir_with_save_hf_final(tmp_path):
    from qwenvl_mcore.conversion.live import HOLD_ENV
    from qwenvl_mcore.testing import tiny
    from qwenvl_mcore.testing.dist import run_on_ranks

    hf = tiny.save_tiny_hf_checkpoint(tmp_path / "hf", seed=3, num_hidden_layers=3, text={"num_experts": 6})
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "qwenvl_mcore.train", "trainer.steps=2", "data.num_workers=0",
           "data.global_batch_size=2", "optim.warmup_steps=0", "logging.progress_bar=false",
           "logging.tensorboard=false", f"trainer.dir={run_dir}", f"model.init_from={hf}",
           "checkpoint.save_hf=final", "checkpoint.hf_max_shard_size=100KB"]
    hold = tmp_path / "hold"
    hold.mkdir()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**env, HOLD_ENV: str(hold)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (hold / "hf_writing_1").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.kill()
    proc.communicate(timeout=60)
    ckpts = run_dir / "checkpoints"
    assert sorted(os.listdir(ckpts)) == [".step_0000002.incomplete"]  # no step directory, no `latest`
    staged = ckpts / ".step_0000002.incomplete" / "hf"
    assert list(staged.glob("model-*.safetensors")) and not (staged / "model.safetensors.index.json").exists()
    assert [d for d, _, _ in os.walk(run_dir) if _looks_complete(Path(d))] == []

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " on 1 ranks, " in done.stdout and "done at step 2" in done.stdout
    assert "removed what killed saves left" in done.stdout
    assert sorted(os.listdir(ckpts)) == ["latest", "step_0000002"]
    step_dir = ckpts / "step_0000002"
    out = step_dir / "hf"
    assert _looks_complete(out) and len(list(out.glob("model-*.safetensors"))) > 2
    config = json.loads((out / "config.json").read_text())["text_config"]
    assert (config["num_hidden_layers"], config["num_experts"]) == (3, 6)
    report = run_on_ranks(hf_vs_checkpoint, 1, [(str(out), str(step_dir))])[0][0]
    assert report["max_abs_logit_diff"] <= 1e-5 and report["top1_agreement"] == 1.0, report


def test_lora_on_an_hf_base_saves_merged_hf_equal_to_merge_lora_export(tmp_path):
    """peft=lora on an HF directory in the transformers-5 expert layout (one rank, no torchrun), save_hf=final: the
    step's hf/ holds the base with the adapters merged, bit-identical to `mcore2hf --merge-lora` of the same
    checkpoint (which finds the HF base by its reference and hash); the targeted weights moved, every other one is
    the base's (in the released layout)."""
    import torch

    from qwenvl_mcore.conversion.hf_io import SafetensorsReader
    from qwenvl_mcore.lora import training as lora_training
    from qwenvl_mcore.lora.export import merge_lora
    from qwenvl_mcore.testing import tiny

    base = tiny.save_tiny_hf_checkpoint(tmp_path / "base", seed=5, expert_layout="transformers5")
    released = tiny.save_tiny_hf_checkpoint(tmp_path / "released", seed=5)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "qwenvl_mcore.train", "peft=lora", "trainer.steps=2",
                           "data.num_workers=0", "data.global_batch_size=2", "optim.warmup_steps=0", "optim.lr=1e-2",
                           "logging.progress_bar=false", "logging.tensorboard=false", f"trainer.dir={run_dir}",
                           f"model.init_from={base}", "checkpoint.save_hf=final"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step_dir = run_dir / "checkpoints" / "step_0000002"
    info = json.loads((step_dir / "qwenvl_mcore.json").read_text())
    assert info["kind"] == "lora" and info["base"] == lora_training.base_reference(str(base))
    result = merge_lora(str(step_dir), str(tmp_path / "merged"), progress=False)
    assert result["base"] == str(base.resolve()) and result["merged"] > 0
    ours, exported = SafetensorsReader(step_dir / "hf"), SafetensorsReader(tmp_path / "merged")
    original = SafetensorsReader(released)
    assert ours.names() == exported.names() == original.names()
    assert [n for n in ours.names() if not torch.equal(ours.get(n), exported.get(n))] == []
    moved = [n for n in ours.names() if not torch.equal(ours.get(n), original.get(n))]
    assert len(moved) == result["merged"]
