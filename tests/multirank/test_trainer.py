"""The trainer through its entry point (`torchrun -m qwenvl_mcore.train`), on the tiny model from one converted
checkpoint, with 20 synthetic samples of uneven length (so loss tokens differ across ranks and micro-batches):

- parallelism invariance: 10 steps of one global batch (8 samples) at DP4, TP2xEP2 (DP2), PP2xDP2, ETP2, uneven
  PP3 (2/1/1 layers), CP2xTP2xEP2 and CP2xEP2 (DP2) give the single-rank run's losses within 1e-5 and grad norms
  within 1e-4 relative, the same load-balancing loss, and that loss equals transformers' formula on the same batch;
  a CP2xTP2xEP2 checkpoint resumed on one rank continues the trajectory, resumed at CP2xTP2xEP2 bit for bit;
- overfitting: the loss falls by half in 30 steps at TP2/EP2/SP and at PP2;
- resume: a run stopped by SIGTERM and started again gives the straight run's losses and final weights bit for bit;
  resumed at another layout (TP2/EP2 -> TP1/EP4, PP2 -> PP1) it stays within 1e-5 and its Adam moments are the saved
  ones; every sample is seen once per epoch (epochs straddle global batches);
- logging: tensorboard holds loss, lr, grad norm, tokens/s, MFU and per-layer expert load; an offline wandb run
  directory appears;
- a trained checkpoint (optimizer state included) exports to HF exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from qwenvl_mcore.checkpoint import dcp
from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.dist import run_on_ranks

from _resume_checks import load_and_resave

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(tempfile.mkdtemp(prefix="qwenvl-trainer-test-"))
AUX = 0.1
STEPS = 30
COMMON = [
    "data.packing=false", "data.num_workers=0", "data.num_samples=20", "data.valid_samples=0",
    "data.global_batch_size=8", "data.seq_length=192",
    "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=3", f"optim.decay_steps={STEPS}",
    "optim.weight_decay=0.0", f"model.aux_loss_coeff={AUX}", "logging.progress_bar=false", "logging.sample_ids=true",
    "logging.tensorboard=false", "checkpoint.every=10", "checkpoint.keep=5",
]
LAYOUTS = {
    "single": (1, ["trainer.eval_every=5", "data.valid_samples=8"]),
    "dp4": (4, []),
    "tp2_ep2": (4, ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"]),
    "pp2": (4, ["parallel.pp=2"]),
    "etp2": (4, ["parallel.ep=2", "parallel.etp=2"]),
    "tp1_ep4": (4, ["parallel.ep=4"]),
    # uneven stages: 2/1/1 of the 4 layers (DeepStack's targets on the first), 8 micro-batches through 1F1B
    "pp3_uneven": (3, ["parallel.pp=3", "parallel.first_stage_layers=2", "parallel.last_stage_layers=1"]),
    # context parallelism: each sample's row split over 2 CP ranks, with TP2 (SP) and EP2 (DP1), and with EP2 x DP2
    "cp2_tp2_ep2": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"]),
    "cp2_ep2": (4, ["parallel.cp=2", "parallel.ep=2"]),
}


# straight runs that other tests continue past step 10 (one run per layout: its directory is named after it)
LONGER = {"tp2_ep2": STEPS, "pp2": STEPS, "cp2_tp2_ep2": 12}


@functools.cache
def hf_and_mcore() -> tuple[Path, Path]:
    from qwenvl_mcore.conversion.convert import hf_to_mcore

    hf = tiny.save_tiny_hf_checkpoint(WORK / "hf", seed=0)
    hf_to_mcore(str(hf), str(WORK / "mcore"), progress=False)
    return hf, WORK / "mcore"


def command(name: str, run_dir: Path, steps: int, extra: list[str] = ()) -> list[str]:
    world, layout = LAYOUTS[name]
    _, mcore = hf_and_mcore()
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "qwenvl_mcore.train", *COMMON, *layout, f"model.init_from={mcore}", f"trainer.dir={run_dir}",
            f"trainer.steps={steps}", *extra]


def train(name: str, run_dir: Path, steps: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(name, run_dir, steps, extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in lines if m["kind"] == kind]


@functools.cache
def straight(name: str, steps: int = 10) -> list[dict]:
    run_dir = WORK / f"straight_{name}"
    extra = ["logging.tensorboard=true", "logging.wandb=true", "logging.wandb_mode=offline",
             "logging.peak_tflops=0.01"] if name == "tp2_ep2" else []
    train(name, run_dir, steps, extra)
    return metrics(run_dir)


def model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    meta = dcp.tensor_metadata(str(ckpt))
    keys = [k for k in meta if "optimizer.state." not in k]
    return read_all(ckpt, keys)


def read_all(ckpt: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    meta = dcp.tensor_metadata(str(ckpt))
    requests = [(k, (0,) * len(meta[k].size), tuple(meta[k].size), meta[k].properties.dtype) for k in keys]
    return dict(zip(keys, dcp.read_regions(str(ckpt), requests)))


def close(a: list[dict], b: list[dict], *, loss_tol: float, norm_rel: float, aux_tol: float) -> list[str]:
    bad = []
    for x, y in zip(a, b, strict=True):
        assert x["step"] == y["step"]
        if abs(x["loss"] - y["loss"]) > loss_tol:
            bad.append(f"step {x['step']}: loss {x['loss']} vs {y['loss']}")
        if abs(x["grad_norm"] - y["grad_norm"]) > norm_rel * abs(y["grad_norm"]):
            bad.append(f"step {x['step']}: grad norm {x['grad_norm']} vs {y['grad_norm']}")
        if abs(x["aux_loss"] - y["aux_loss"]) > aux_tol:
            bad.append(f"step {x['step']}: aux {x['aux_loss']} vs {y['aux_loss']}")
    return bad


# -- invariance ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dp4", "tp2_ep2", "pp2", "etp2", "pp3_uneven", "cp2_tp2_ep2", "cp2_ep2"])
def test_layouts_give_the_single_rank_run(name):
    ref = straight("single")
    ours = straight(name, LONGER.get(name, 10))[:10]
    assert len(ref) == len(ours) == 10 and not any(m["skipped"] for m in ref + ours)
    assert ours[0]["loss_tokens"] == ref[0]["loss_tokens"]
    assert len({m["loss_tokens"] for m in ref}) > 1  # uneven batches
    assert close(ours, ref, loss_tol=1e-5, norm_rel=1e-4, aux_tol=1e-6) == []
    assert [m["sample_ids"] for m in ours] == [m["sample_ids"] for m in ref]


def test_validation_loss_is_logged():
    straight("single")
    valid = metrics(WORK / "straight_single", kind="valid")
    assert [m["step"] for m in valid] == [5, 10]
    assert all(math.isfinite(m["loss"]) and m["tokens"] > 0 for m in valid)
    assert valid[0]["tokens"] == valid[1]["tokens"] and valid[1]["loss"] < valid[0]["loss"]


def test_logged_aux_loss_is_transformers_formula_on_the_same_batch():
    """Step 1 (weights = the HF checkpoint): the logged load-balancing loss is the mean over the step's 8
    micro-batches of transformers' aux loss of each (padding masked), and the total is LM + c x aux."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from qwenvl_mcore.data.collate import collate
    from qwenvl_mcore.data.synthetic import SyntheticConversations

    first = straight("single")[0]
    hf_dir, _ = hf_and_mcore()
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    processor = tiny.build_processor(tiny.build_tokenizer())
    data = SyntheticConversations(processor, 20, seed=0)
    cfg = model.config
    values = []
    with torch.no_grad():
        for i in first["sample_ids"]:
            mb = collate([data[i]], 192, processor.tokenizer.pad_token_id)
            types = torch.zeros_like(mb.input_ids)
            types[mb.input_ids == cfg.image_token_id] = 1
            types[mb.input_ids == cfg.video_token_id] = 2
            kwargs = {k: getattr(mb, k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                  "video_grid_thw") if getattr(mb, k) is not None}
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, mm_token_type_ids=types,
                        output_router_logits=True, **kwargs)
            values.append(float(out.aux_loss))
    assert abs(first["aux_loss"] - sum(values) / len(values)) <= 1e-6, (first["aux_loss"], values)
    assert first["total_loss"] == pytest.approx(first["loss"] + AUX * first["aux_loss"], rel=1e-12)


# -- overfitting ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tp2_ep2", "pp2"])
def test_loss_halves_in_30_steps(name):
    losses = [m["loss"] for m in straight(name, STEPS)]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] <= 0.5 * losses[0], losses


# -- resume --------------------------------------------------------------------------------------------------------
@functools.cache
def interrupted() -> tuple[Path, int]:
    """The TP2/EP2 run stopped by SIGTERM to torchrun after its periodic checkpoint of step 10, then started again
    to the end. torchrun passes the signal to each rank's process group: what the first save started there (once a
    Manager process of megatron's checkpoint writer) must survive it, or the stop checkpoint fails."""
    run_dir = WORK / "interrupted"
    proc = subprocess.Popen(command("tp2_ep2", run_dir, STEPS), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its checkpoint of step 10"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    stopped = len(metrics(run_dir))
    assert f"stopped by signal at step {stopped}" in out, out[-4000:]
    assert 10 <= stopped < STEPS and (run_dir / "checkpoints" / f"step_{stopped:07d}").is_dir()
    train("tp2_ep2", run_dir, STEPS)
    return run_dir, stopped


def test_sigterm_then_resume_is_bit_identical():
    ref = straight("tp2_ep2", STEPS)
    run_dir, stopped = interrupted()
    ours = metrics(run_dir)
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "aux_loss", "sample_ids", "lr"):
        assert [m[key] for m in ours] == [m[key] for m in ref], key
    final = f"checkpoints/step_{STEPS:07d}"
    a, b = model_tensors(WORK / "straight_tp2_ep2" / final), model_tensors(run_dir / final)
    assert a.keys() == b.keys() and len(a) == 45  # every stored model tensor of the tiny model
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_every_sample_once_per_epoch():
    run_dir, _ = interrupted()
    stream = [i for m in metrics(run_dir) for i in m["sample_ids"]]
    assert len(stream) == STEPS * 8
    epochs = [stream[e * 20:(e + 1) * 20] for e in range(len(stream) // 20)]
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == len(epochs)  # reshuffled every epoch


def _resume_elsewhere(source: Path, step: int, name: str, tag: str) -> Path:
    """Copy checkpoint `step` of `source` into a fresh run directory and continue it at layout `name`."""
    run_dir = WORK / f"resume_{tag}"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / f"step_{step:07d}", ckpts / f"step_{step:07d}")
    (ckpts / "latest").write_text(f"step_{step:07d}\n")
    return run_dir


# The lean optimizer step (training/optimizer_step.py) against megatron's optimizer.step() at 4 ranks, run in the
# resave launch below: a ChainedOptimizer (dense at DP4, experts at EP2 x DP2) with the distributed optimizer's
# parameter all-gather; PP2 x DP2; the non-distributed optimizer at EP2, whose dense and expert grad-stats groups
# differ (one norm per group, combined as ChainedOptimizer.get_grad_norm does). Clipping on every step (clip 1.0).
STEP_CASES = {"ep2_dp4": ({"ep": 2}, {}), "pp2_dp2": ({"pp": 2}, {}),
              "ep2_fp32_optimizer": ({"ep": 2}, {"distributed_optimizer": False})}


@functools.cache
def resaved_at_tp1_ep4() -> tuple[Path, list[dict]]:
    """The TP2/EP2 run's stop checkpoint copied to a fresh run directory, loaded at TP1/EP4 and saved again at once
    (no step) under WORK/resaved, in a 4-rank launch that also runs STEP_CASES. (run directory, per-rank results)"""
    source, stopped = interrupted()
    run_dir = _resume_elsewhere(source, stopped, "tp1_ep4", "tp1_ep4")
    world, layout = LAYOUTS["tp1_ep4"]
    _, mcore = hf_and_mcore()
    overrides = [*COMMON, *layout, f"model.init_from={mcore}", f"trainer.dir={run_dir}", f"trainer.steps={STEPS}"]
    return run_dir, run_on_ranks(load_and_resave, world, overrides, str(WORK / "resaved"), STEP_CASES)


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_lean_optimizer_step_is_megatrons_at_four_ranks(name):
    _, launch = resaved_at_tp1_ep4()
    for rank, out in enumerate(launch):
        r = out["optimizer_steps"][name]
        assert r["fallback"] is None and r["ref_fallback"] is not None, (rank, r["fallback"])
        assert r["bitwise"], (rank, r["worst_rel"], r["worst_name"])
        assert r["norms"] == r["ref_norms"] and all(n is not None and n > 1.0 for n in r["norms"]), rank  # clips
        assert r["losses"] == r["ref_losses"] and not any(r["skipped"])
        parts = r["parts"]
        assert len(parts) == 2 and all(p["copies"] == 0 and not p["cast"] for p in parts), (rank, parts)
        # the distributed optimizer all-gathers the parameters (data-parallel size > 1) once for both sub-optimizers
        assert r["gathers"] == (0 if name == "ep2_fp32_optimizer" else 1), (rank, r["gathers"])
    assert len({tuple(out["optimizer_steps"][name]["norms"]) for out in launch}) == 1  # one norm on every rank


def test_resume_at_another_layout_keeps_the_trajectory_and_adam_moments():
    ref = straight("tp2_ep2", STEPS)
    source, stopped = interrupted()
    # TP2/EP2 -> TP1/EP4: first load it there and save it again at once (no step), so the optimizer state can be
    # compared, then continue
    run_dir, launch = resaved_at_tp1_ep4()
    saved = source / "checkpoints" / f"step_{stopped:07d}"
    original = {k: v for k, v in read_all(saved, list(dcp.tensor_metadata(str(saved)))).items()}
    resaved_dir = Path(launch[0]["resaved"])
    assert resaved_dir == WORK / "resaved" / f"step_{stopped:07d}"
    resaved = read_all(resaved_dir, list(dcp.tensor_metadata(str(resaved_dir))))
    moments = [k for k in original if "exp_avg" in k]
    assert len(moments) > 50 and set(original) == set(resaved)
    assert [k for k in original if not torch.equal(original[k], resaved[k])] == []
    train("tp1_ep4", run_dir, 20)
    ours = metrics(run_dir)
    assert [m["step"] for m in ours] == list(range(stopped + 1, 21))
    assert close(ours, ref[stopped:20], loss_tol=1e-5, norm_rel=1e-4, aux_tol=1e-6) == []
    # PP2 -> PP1 (one rank)
    pp_source = WORK / "straight_pp2"
    straight("pp2", STEPS)
    run_dir = _resume_elsewhere(pp_source, 10, "single", "pp1")
    train("single", run_dir, 20)
    ours = metrics(run_dir)
    assert [m["step"] for m in ours] == list(range(11, 21))
    assert close(ours, ref[10:20], loss_tol=1e-5, norm_rel=1e-4, aux_tol=1e-6) == []


def test_resume_from_context_parallel_on_one_rank():
    """A checkpoint saved at CP2 x TP2 x EP2 (step 10) resumed on one rank (CP1) continues the trajectory: steps
    11-20 within 1e-5 (loss), 1e-4 relative (grad norm) and 1e-6 (aux) of the straight run."""
    ref = straight("tp2_ep2", STEPS)
    straight("cp2_tp2_ep2", LONGER["cp2_tp2_ep2"])
    run_dir = _resume_elsewhere(WORK / "straight_cp2_tp2_ep2", 10, "single", "cp1")
    train("single", run_dir, 20)
    ours = metrics(run_dir)
    assert [m["step"] for m in ours] == list(range(11, 21))
    assert close(ours, ref[10:20], loss_tol=1e-5, norm_rel=1e-4, aux_tol=1e-6) == []


def test_resume_at_context_parallel_is_bit_identical():
    """The CP2 x TP2 x EP2 run's step-10 checkpoint resumed at the same layout gives steps 11-12 and the final
    weights of the straight run bit for bit."""
    steps = LONGER["cp2_tp2_ep2"]
    ref = straight("cp2_tp2_ep2", steps)
    run_dir = _resume_elsewhere(WORK / "straight_cp2_tp2_ep2", 10, "cp2_tp2_ep2", "cp2")
    train("cp2_tp2_ep2", run_dir, steps)
    ours = metrics(run_dir)
    assert [m["step"] for m in ours] == list(range(11, steps + 1))
    for key in ("loss", "grad_norm", "aux_loss", "sample_ids", "lr"):
        assert [m[key] for m in ours] == [m[key] for m in ref[10:]], key
    final = f"checkpoints/step_{steps:07d}"
    a, b = model_tensors(WORK / "straight_cp2_tp2_ep2" / final), model_tensors(run_dir / final)
    assert a.keys() == b.keys() and len(a) == 45
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# -- logging and export --------------------------------------------------------------------------------------------
def test_tensorboard_and_offline_wandb():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight("tp2_ep2", STEPS)
    logs = WORK / "straight_tp2_ep2" / "logs"
    acc = EventAccumulator(str(logs / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/aux_loss",
                "expert_load/layer_000_max_over_mean", "expert_load/layer_003_max_over_mean"):
        assert tag in tags, sorted(tags)
    assert len(acc.Scalars("train/loss")) == STEPS
    assert all(e.value >= 1.0 for e in acc.Scalars("expert_load/layer_000_max_over_mean"))
    runs = list((logs / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), list((logs / "wandb").iterdir())


def test_trained_checkpoint_with_optimizer_state_exports_exactly():
    from qwenvl_mcore.conversion.convert import hf_to_mcore, mcore_to_hf

    straight("tp2_ep2", STEPS)
    save_root = WORK / "straight_tp2_ep2" / "checkpoints"
    mcore_to_hf(str(save_root), str(WORK / "export"), progress=False)  # the save root: its `latest`
    hf_to_mcore(str(WORK / "export"), str(WORK / "reimported"), progress=False)
    trained = model_tensors(save_root / f"step_{STEPS:07d}")
    back = model_tensors(WORK / "reimported")
    assert trained.keys() == back.keys()
    assert [k for k in trained if not torch.equal(trained[k], back[k])] == []
    assert (WORK / "export" / "config.json").is_file() and os.listdir(WORK / "export")
