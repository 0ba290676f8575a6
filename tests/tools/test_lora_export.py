"""LoRA checkpoints out to HF and back (issue 18): `mcore2hf --adapter-only` and `--merge-lora`, `verify.py
--adapter`, `peft.init_from`, and the refusals of each. CPU, gloo, the tiny model.

One launch (tests/multirank/_lora_export_checks.py, 2 ranks) trains 3 LoRA steps at TP2xEP2+SP on every target
kind (router included), exports the checkpoint with the CLI (`--adapter-only`), starts a run at EP2 from that
adapter and runs the bad `peft.init_from` inputs; the tests here run the other CLIs on its outputs.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.dist import run_on_ranks

from _lora_export_checks import REFUSALS, export_checks

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(tempfile.mkdtemp(prefix="qwenvl-lora-export-"))
# tiny model: 4 LLM layers x (q, k, v, o, experts gate_up + down, router), 3 ViT blocks x 4, 3 mergers x 2; A and B
N_ADAPTERS = 2 * (4 * 7 + 3 * 4 + 3 * 2)


def _tool(tool: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/convert" / tool), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@functools.cache
def base() -> tuple[Path, Path]:
    """(the tiny HF model, its converted checkpoint): the frozen base."""
    from qwenvl_mcore.conversion.convert import hf_to_mcore

    hf = tiny.save_tiny_hf_checkpoint(WORK / "hf", seed=0)
    hf_to_mcore(str(hf), str(WORK / "base"), progress=False)
    return Path(hf), WORK / "base"


@functools.cache
def launch() -> list[dict]:
    return run_on_ranks(export_checks, 2, str(WORK / "runs"), str(base()[1]))


@functools.cache
def merged() -> Path:
    launch()  # the trained LoRA run it merges (a test run alone must not depend on the order)
    out = WORK / "merged"
    proc = _tool("mcore2hf.py", "--mcore", WORK / "runs" / "trained", "--out", out, "--merge-lora", "--procs", 2,
                 "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["merged"] == N_ADAPTERS // 2, result  # one transformers weight per A and B pair
    return out


def _adapter() -> Path:
    r = launch()[0]
    assert r["export"]["rc"] == 0, r["export"]["stderr"][-4000:]
    return WORK / "runs" / "adapter"


def test_adapter_only_writes_the_checkpoints_adapters_as_peft():
    """--adapter-only on the trainer.dir: adapter_config.json (r, alpha, every target) and all 92 tensors, each
    bit-identical to the trained model's adapters gathered in peft's names and layout; the CLI says one JSON line."""
    r = launch()[0]
    assert r["trained_status"] == "completed"
    adapter = _adapter()
    result = json.loads(r["export"]["stdout"].strip().splitlines()[-1])
    assert result["kind"] == "peft_adapter" and result["tensors"] == N_ADAPTERS and result["rank"] == 4, result
    assert r["export"]["stderr"] == ""
    written = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(written) == set(r["trained"]) and len(written) == N_ADAPTERS
    assert [k for k in written if not torch.equal(written[k], r["trained"][k])] == []
    assert all(v.abs().max() > 0 for k, v in written.items() if ".lora_B." in k)  # trained: no B left at 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj",
                                                   "mlp.gate.weight"]
    assert config["base_model_name_or_path"] == os.path.abspath(base()[0])


def test_verify_adapter_matches_transformers_with_peft():
    """verify.py --hf BASE --adapter (the exported directory) at TP2xEP2: our model with the adapter against
    transformers + peft.PeftModel.from_pretrained with it, fp32: max |dlogit| <= 1e-4, top-1 all equal."""
    proc = _tool("verify.py", "--hf", base()[0], "--adapter", _adapter(), "--tp", 2, "--ep", 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["adapter"] == str(_adapter())
    assert report["max_abs_logit_diff"] <= 1e-4 and report["top1_agreement"] == 1.0, report


def test_merge_lora_equals_transformers_with_peft():
    """--merge-lora (2 processes): plain transformers loads the output, whose logits equal transformers + peft with
    the exported adapter within 1e-5 (fp32) and differ from the base's by more than 1e-2 (the merge did something);
    every weight no adapter targets is bit-identical to the base's export."""
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    hf_dir, _ = base()
    out = merged()
    processor = AutoProcessor.from_pretrained(hf_dir)
    batch = tiny.sample_inputs(processor, "image_video")
    plain = Qwen3VLMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ref = Qwen3VLMoeForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = ref.eval()(**batch).logits
        ref = PeftModel.from_pretrained(ref, str(_adapter())).eval()
        want = ref(**batch).logits
        got = plain(**batch).logits
    assert (got - want).abs().max().item() <= 1e-5, (got - want).abs().max().item()
    assert (got - base_logits).abs().max().item() > 1e-2
    merged_tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    base_tensors = {k: v for f in hf_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(merged_tensors) == set(base_tensors)
    targeted = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.o_proj.",
                ".mlp.experts.", ".mlp.gate.weight", ".attn.qkv.", ".attn.proj.", ".mlp.linear_fc", "merger")
    untouched = [k for k in base_tensors if not any(t in k for t in targeted)]
    assert len(untouched) > 10
    assert [k for k in untouched if not torch.equal(merged_tensors[k], base_tensors[k])] == []


def test_init_from_imports_the_exported_adapter_bit_for_bit():
    """A run with peft.init_from=<the exported adapter> (at EP2, another layout than the trained TP2xEP2) holds
    exactly the adapter's tensors: after one step at lr 0 every gathered adapter equals the file bit for bit, and
    so the trained run's (apply_lora's own init would give B = 0)."""
    results = launch()
    written = load_file(str(_adapter() / "adapter_model.safetensors"))
    for rank, r in enumerate(results):
        assert r["imported_status"] == "completed" and r["imported_steps"] == 1, rank
        assert set(r["imported"]) == set(written)
        assert [k for k in written if not torch.equal(r["imported"][k], written[k])] == [], rank
    assert results[0]["resume_ignores_init_from"] is None  # resumed: the bad peft.init_from is not even read


@pytest.mark.parametrize("name,needles", [
    ("rank", ["peft.rank=8 but the adapter has r=4", "Set peft.rank=4"]),
    ("alpha_targets", ["peft.alpha=16.0 but the adapter has lora_alpha=8.0", "peft.targets=['k', 'o', 'q', 'v']",
                       "Set peft.alpha=8.0 peft.targets=[all,router] (the adapter's)"]),
    ("rslora", ["peft.rslora=True but the adapter has use_rslora=False", "peft.rslora=false"]),
    ("llama", ["not made for transformers' Qwen3VLMoeForConditionalGeneration", "meta-llama/Llama-2-7b-hf",
               "self_attn.q_proj"]),
    ("model_type", ["'llama' model, not Qwen3-VL MoE"]),
    ("shapes", ["do not fit this model", "attn.qkv.lora_B.weight"]),
    ("not_adapter", ["is not a PEFT adapter directory (no adapter_config.json)", "HF model directory"]),
])
def test_bad_init_from_is_refused_before_any_step(name, needles):
    assert name in REFUSALS
    for rank, r in enumerate(launch()):
        error = r[f"{name}_error"]
        assert error is not None and error.startswith("ConfigError"), (rank, error)
        assert all(n in error for n in needles), error
        assert r[f"{name}_steps"] == 0


def test_init_from_without_lora_is_refused():
    from qwenvl_mcore.training import config

    with pytest.raises(config.ConfigError, match="peft.init_from=x .* needs peft=lora"):
        config.compose(["peft.init_from=x"])


@pytest.mark.parametrize("flags,needles", [
    ((), ["is a LoRA checkpoint", "--adapter-only", "--merge-lora"]),
    (("--adapter-only",), ["--adapter-only exports a LoRA training checkpoint", "'converted' checkpoint"]),
    (("--merge-lora",), ["--merge-lora exports a LoRA training checkpoint", "'converted' checkpoint"]),
])
def test_mcore2hf_refuses_the_wrong_mode_with_exit_2(flags, needles, tmp_path):
    """A LoRA checkpoint without --adapter-only / --merge-lora, and either flag on a converted checkpoint: exit 2
    before anything is written, the message naming the flags."""
    launch()
    mcore = WORK / "runs" / "trained" if not flags else base()[1]
    proc = _tool("mcore2hf.py", "--mcore", mcore, "--out", tmp_path / "out", *flags, "--no-progress")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert all(n in proc.stderr for n in needles), proc.stderr
    assert not (tmp_path / "out").exists()


def test_merge_lora_refuses_another_base(tmp_path):
    """--merge-lora --base <a checkpoint of other weights>: refused naming both paths and hashes, nothing written."""
    from qwenvl_mcore.conversion.convert import hf_to_mcore

    launch()
    hf = tiny.save_tiny_hf_checkpoint(tmp_path / "hf", seed=1)
    hf_to_mcore(str(hf), str(tmp_path / "other"), progress=False)
    proc = _tool("mcore2hf.py", "--mcore", WORK / "runs" / "trained", "--out", tmp_path / "out", "--merge-lora",
                 "--base", tmp_path / "other", "--no-progress")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "was trained on the base" in proc.stderr and str(tmp_path / "other") in proc.stderr
    assert str(base()[1]) in proc.stderr and "--base" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_merge_formula_is_peft_s_in_both_expert_layouts():
    """MergeLoRA on the fused expert tensors: W + scale * delta with peft's own formula (delta_e = B_e @ A_e from
    A [E*r, in] expert-major and B [out, r*E] expert-minor), laid out [E, out, in] for transformers 5's layout and
    transposed for the released one; plain linears W + scale * B @ A."""
    from qwenvl_mcore.lora.export import MergeLoRA

    e, r, i, o = 3, 2, 5, 7
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(e * r, i, generator=gen), torch.randn(o, r * e, generator=gen)
    a2, b2 = torch.randn(r, i, generator=gen), torch.randn(o, r, generator=gen)
    keys = {"x.lora_A.weight": "m.mlp.experts.gate_up_proj", "x.lora_B.weight": "m.mlp.experts.gate_up_proj",
            "y.lora_A.weight": "m.q_proj.weight", "y.lora_B.weight": "m.q_proj.weight"}
    merge = MergeLoRA({"x.lora_A.weight": a, "x.lora_B.weight": b, "y.lora_A.weight": a2, "y.lora_B.weight": b2},
                      keys, scale=0.5)
    want = torch.einsum("ore,eri->eoi", b.view(o, r, e), a.view(e, r, i)) * 0.5
    w5, wr = torch.randn(e, o, i, generator=gen), torch.randn(e, i, o, generator=gen)
    torch.testing.assert_close(merge("m.mlp.experts.gate_up_proj", w5, "transformers5"), w5 + want)
    torch.testing.assert_close(merge("m.mlp.experts.gate_up_proj", wr, "released"), wr + want.transpose(1, 2))
    w = torch.randn(o, i, generator=gen, dtype=torch.bfloat16)
    torch.testing.assert_close(merge("m.q_proj.weight", w, "released"), w.float() + 0.5 * b2 @ a2)
    assert merge("m.k_proj.weight", w, "released") is w
    with pytest.raises(ValueError, match="does not fit the weight"):
        merge("m.mlp.experts.gate_up_proj", w5, "released")


@pytest.mark.parametrize("change,needle", [
    ({"use_dora": True}, "use_dora=True"),
    ({"peft_type": "IA3"}, "'IA3' adapter, not LoRA"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern="),
    ("bin", "adapter_model.bin, a pickle"),
])
def test_adapter_variants_we_do_not_compute_are_refused(change, needle, tmp_path):
    from qwenvl_mcore.lora import LoRAConfig, LoRAConfigError, adapter_dir

    src = _adapter()
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {**json.loads((src / "adapter_config.json").read_text()), **(change if isinstance(change, dict) else {})}))
    if change == "bin":
        (tmp_path / "adapter_model.bin").write_bytes(b"")
    else:
        (tmp_path / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    run = LoRAConfig(method="lora", rank=4, alpha=8.0, targets=["all", "router"], init_from=str(tmp_path))
    with pytest.raises(LoRAConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        adapter_dir.check_init_adapter(run)
    if change == "bin":
        return
    (tmp_path / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    adapter_dir.check_init_adapter(run)  # the unchanged adapter passes


def test_verify_refuses_an_adapter_of_another_model():
    """verify.py --adapter with an adapter that is not Qwen3-VL MoE's: exit 2 naming it, before any rank starts."""
    proc = _tool("verify.py", "--hf", base()[0], "--adapter", WORK / "runs" / "bad_llama", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--adapter" in proc.stderr and "meta-llama/Llama-2-7b-hf" in proc.stderr
    assert "Warning" not in proc.stderr  # the libraries' known notices stay off the console
