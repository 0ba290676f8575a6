"""The run configuration: every experiment composes, validates and fits its model; mistakes stop the run at startup
naming the key; the FLOP count follows the Megatron formula of ../shared/notes/performance.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
from qwenvl_mcore.models.qwen3_vl_moe.layout_checks import validate_layout
from qwenvl_mcore.training import metrics
from qwenvl_mcore.training.config import CONF_DIR, ConfigError, compose, layout_of

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[2]


def test_there_are_experiments():
    assert {"debug_cpu_tp2_ep2", "sft_30b_a3b_1x8xh100", "sft_30b_a3b_2x8xh100", "sft_235b_a22b_8x8xh100",
            "lora_235b_a22b_1x8xh100", "lora_30b_a3b_1x4xh100", "lora_30b_a3b_32k_1x8xh100"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_its_layout_fits_the_model(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.trainer.name == name  # one file = one run, named for it
    args = args_from_hf_config(flavor_hf_config(cfg.model.flavor))
    validate_layout(args, layout_of(cfg))
    if name.startswith("sft_30b"):
        assert args.text.num_hidden_layers == 48 and args.text.num_experts == 128
    if name.startswith(("sft_235b", "lora_235b")):
        assert args.text.num_hidden_layers == 94
    if name.startswith("lora_"):  # a frozen base in bf16 and adapters (conf/peft/lora.yaml), on the named GPUs
        assert cfg.peft.method == "lora" and cfg.model.init_from and cfg.model.dtype == "bf16"
        gpus = {"lora_235b_a22b_1x8xh100": 8, "lora_30b_a3b_1x4xh100": 4, "lora_30b_a3b_32k_1x8xh100": 8}[name]
        validate_layout(args, layout_of(cfg), gpus)
    if name == "lora_30b_a3b_32k_1x8xh100":  # 32K-token rows split over CP2 (x TP2 x EP8, DP2 on 8 GPUs)
        assert cfg.data.seq_length == 32768 and cfg.data.packing and layout_of(cfg).cp == 2
        assert layout_of(cfg).data_parallel_size(8) == 2
    if name == "sft_235b_a22b_8x8xh100":  # full fine-tune at 8K on 64 GPUs: TP4 x PP4 (19/25/25/25) x EP16, DP4
        lay = layout_of(cfg)
        assert cfg.data.seq_length == 8192 and (lay.tp, lay.pp, lay.ep, lay.first_stage_layers) == (4, 4, 16, 19)
        validate_layout(args, lay, 64)
        assert lay.data_parallel_size(64) == 4 and lay.expert_data_parallel_size(64) == 1


@pytest.mark.parametrize("override, names", [
    (["optim.lrr=1e-5"], ["optim.lrr", "lrr"]),
    (["+optim.lrr=1e-5"], ["lrr"]),
    (["+trainer.stepz=3"], ["stepz"]),
    (["parallel.tp=two"], ["parallel.tp", "two"]),
    (["model.freeze_vision=maybe"], ["model.freeze_vision"]),
    (["model.dtype=fp16"], ["model.dtype", "bf16"]),
    (["experiment=sft_30b_a3b_1x8xh1000"], ["experiment/sft_30b_a3b_1x8xh1000"]),
    (["data.packing=false", "data.global_batch_size=6", "data.micro_batch_size=4"],
     ["data.global_batch_size", "data.micro_batch_size"]),
    (["data.micro_batch_size=2"], ["data.packing", "data.micro_batch_size=1"]),
    (["data.overlong=cut"], ["data.overlong", "truncate_text"]),
    (["data.train_on=first"], ["data.train_on", "last"]),
    (["data.train=[{weight:2}]"], ["data.train", "path"]),
    (["data.train=[{path:a.jsonl,weight:-1}]"], ["data.train", "positive"]),
    (["parallel.vpp=2"], ["parallel.vpp", "parallel.pp"]),
    (["data.seq_length=0"], ["data.seq_length"]),
])
def test_mistakes_fail_naming_the_key(override, names):
    with pytest.raises(ConfigError) as info:
        compose(override)
    for name in names:
        assert name in str(info.value), str(info.value)


def test_overrides_reach_the_config():
    cfg = compose(["experiment=debug_cpu_tp2_ep2", "optim.lr=0.5", "parallel.ep=4", "trainer.dir=/x"])
    assert cfg.optim.lr == 0.5 and cfg.parallel.ep == 4 and cfg.parallel.tp == 2
    assert cfg.checkpoint.dir == "/x/checkpoints" and cfg.logging.dir == "/x/logs"


def test_entry_point_rejects_a_misspelled_override_before_starting():
    proc = subprocess.run([sys.executable, "-m", "qwenvl_mcore.train", "optim.lrr=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "optim.lrr" in proc.stderr and "Key 'lrr' not in 'OptimConf'" in proc.stderr


def test_flops_match_the_published_per_token_figures():
    """performance.md: Qwen3-VL-30B-A3B at 4,096-token sequences is 23.01 GFLOP per token (20.59 at 2K, 27.84 at 8K);
    235B-A22B 148.0 at 4K."""
    a30 = args_from_hf_config(flavor_hf_config("qwen3_vl_30b_a3b"))
    a235 = args_from_hf_config(flavor_hf_config("qwen3_vl_235b_a22b"))
    for args, length, expected in ((a30, 4096, 23.01), (a30, 2048, 20.59), (a30, 8192, 27.84), (a235, 4096, 148.0)):
        per_token = metrics.language_flops(args, [length]) / length / 1e9
        assert per_token == pytest.approx(expected, abs=0.05), (length, per_token)  # the note rounds to 4 digits
    assert metrics.lm_head_flops(a30, 4096) == 4096 * 6 * 2048 * 151936  # the head's part of language_flops
    # The ViT: about 12 GFLOP per merged visual token for a 1,024-patch image (32 x 32 patches)
    vit = metrics.vision_flops(a30, torch.tensor([[1, 32, 32]]), vit_trains=True, merger_trains=True)
    assert vit / 256 / 1e9 == pytest.approx(12, rel=0.1)
    frozen = metrics.vision_flops(a30, torch.tensor([[1, 32, 32]]), vit_trains=False, merger_trains=False)
    assert frozen == pytest.approx(vit / 3)
