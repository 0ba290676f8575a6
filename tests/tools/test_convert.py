"""tools/convert/hf2mcore.py and mcore2hf.py: exact round trips (also through a multi-rank load and the trainer's
save path), the released 30B key set, verify.py --mcore, and bad inputs that fail cleanly and leave no output."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwenvl_mcore.checkpoint.model_io import staging_dir_for
from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.dist import run_on_ranks

from _convert_checks import load_check_save

ROOT = Path(__file__).resolve().parents[2]


def _run(tool: str, *args, expect_ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools/convert" / tool), *map(str, args)]
    if tool != "verify.py":
        cmd.append("--no-progress")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
        if tool != "verify.py":  # a good conversion says one JSON line and nothing else (library notices included)
            assert proc.stderr == "", proc.stderr[-4000:]
    return proc


def _tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _assert_bit_exact(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, bad


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny HF checkpoints: the same weights in both expert layouts, and a tied-embedding model."""
    base = tmp_path_factory.mktemp("hf")
    return {
        "released": tiny.save_tiny_hf_checkpoint(base / "released", seed=7, expert_layout="released"),
        "transformers5": tiny.save_tiny_hf_checkpoint(base / "tf5", seed=7, expert_layout="transformers5"),
        "tied": tiny.save_tiny_hf_checkpoint(base / "tied", seed=8, expert_layout="released",
                                             tie_word_embeddings=True),
    }


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    """Each HF checkpoint converted once (the transformers-5 one by 2 processes)."""
    base = tmp_path_factory.mktemp("mcore")
    out = {}
    for name, path in hf.items():
        procs = 2 if name == "transformers5" else 1
        result = json.loads(_run("hf2mcore.py", "--hf", path, "--out", base / name, "--procs", procs)
                            .stdout.strip().splitlines()[-1])
        assert result["tensors"] == (95 if name == "tied" else 96), result
        out[name] = base / name
    return out


@pytest.mark.parametrize("name, flags", [("released", ()), ("transformers5", ("--expert-layout", "transformers5")),
                                         ("tied", ("--procs", "2", "--max-shard-size", "300KB"))])
def test_round_trip_is_bit_exact(hf, converted, tmp_path, name, flags):
    """HF -> mcore -> HF: same key set, dtypes and bytes for every tensor (DeepStack included; tied and untied;
    one and two processes; one shard and several)."""
    out = tmp_path / "hf"
    _run("mcore2hf.py", "--mcore", converted[name], "--out", out, *flags)
    _assert_bit_exact(_tensors(hf[name]), _tensors(out))
    if "--max-shard-size" in flags:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(_tensors(out))
    for f in ("tokenizer.json", "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja"):
        assert (out / f).read_bytes() == (hf[name] / f).read_bytes(), f


def test_transformers5_input_is_exported_in_the_released_layout(hf, converted, tmp_path):
    """Experts read in the transformers-5 layout come out in the released fused layout by default, equal to the
    released files of the same weights, and transformers loads the export into the same parameters."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    out = tmp_path / "hf"
    _run("mcore2hf.py", "--mcore", converted["transformers5"], "--out", out)
    _assert_bit_exact(_tensors(hf["released"]), _tensors(out))
    config = json.loads((out / "config.json").read_text())
    assert "num_experts" in config["text_config"] and "rope_scaling" in config["text_config"]  # released spelling
    ref = Qwen3VLMoeForConditionalGeneration.from_pretrained(hf["transformers5"], dtype=torch.float32).state_dict()
    got = Qwen3VLMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).state_dict()
    _assert_bit_exact(ref, got)


@pytest.mark.parametrize("world, layout", [(4, dict(tp=2, ep=2, sequence_parallel=True)), (4, dict(pp=2, ep=2)),
                                           (3, dict(pp=3, first_stage_layers=2, last_stage_layers=1)),
                                           (2, dict(cp=2, ep=2))],
                         ids=["tp2_ep2_sp", "pp2_ep2", "pp3_uneven", "cp2_ep2"])
def test_load_at_layout_save_and_export_is_bit_exact(hf, converted, tmp_path, world, layout):
    """The converted checkpoint loaded at TP2/EP2/SP (and PP2/EP2, uneven PP3: 2/1/1 layers, and CP2 x EP2, the
    expert-data-parallel group spanning the CP ranks): every weight equals
    the HF file, logits match transformers (<= 1e-4); saved again by the trainer's save path and exported: bit-exact
    with the input."""
    save_root = tmp_path / "run"
    results = run_on_ranks(load_check_save, world, layout, str(hf["released"]), str(converted["released"]),
                           str(save_root))
    compared = set()
    for r in results:
        assert not r["unequal"], r["unequal"]
        compared |= set(r["compared"])
        if r["forward"] is not None:
            assert r["forward"]["max_abs_logit_diff"] <= 1e-4 and r["forward"]["loss_diff"] <= 1e-5, r["forward"]
    assert compared == set(_tensors(hf["released"]))
    assert any(r["forward"] is not None for r in results)
    assert (save_root / "latest").read_text().strip() == "step_0000003"
    out = tmp_path / "hf"
    _run("mcore2hf.py", "--mcore", save_root, "--out", out)  # the save directory: its `latest` is exported
    _assert_bit_exact(_tensors(hf["released"]), _tensors(out))


@pytest.mark.parametrize("flags", [(), ("--tp", "2", "--ep", "2")], ids=["tp1_ep1", "tp2_ep2"])
def test_verify_mcore(hf, converted, flags):
    """verify.py --mcore: our model loaded from the converted checkpoint vs transformers on the HF directory."""
    proc = _run("verify.py", "--hf", hf["released"], "--mcore", converted["released"], *flags)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] <= 1e-4 and report["top1_agreement"] == 1.0, report


def _released_30b_key_set() -> set[str]:
    """The tensor names of the released Qwen3-VL-30B-A3B checkpoint (../shared/reference/checkpoint_layout.md)."""
    lm, vit = "model.language_model", "model.visual"
    keys = {f"{lm}.embed_tokens.weight", "lm_head.weight", f"{lm}.norm.weight"}
    for n in range(48):
        p = f"{lm}.layers.{n}"
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight", f"{p}.mlp.gate.weight",
                 f"{p}.mlp.experts.gate_up_proj", f"{p}.mlp.experts.down_proj"}
        keys |= {f"{p}.self_attn.{x}.weight" for x in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
    keys |= {f"{vit}.patch_embed.proj.weight", f"{vit}.patch_embed.proj.bias", f"{vit}.pos_embed.weight"}
    for b in range(27):
        keys |= {f"{vit}.blocks.{b}.{m}.{w}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1",
                                                         "mlp.linear_fc2") for w in ("weight", "bias")}
    for m in ["merger"] + [f"deepstack_merger_list.{d}" for d in range(3)]:
        keys |= {f"{vit}.{m}.{part}.{w}" for part in ("norm", "linear_fc1", "linear_fc2") for w in ("weight", "bias")}
    return keys


def test_released_30b_key_set_round_trips(tmp_path):
    """A tiny-width model with the released 30B structure (48 LLM layers, 27 ViT blocks, 3 DeepStack mergers):
    all 882 tensors converted and back, none missing or extra, every one bit-exact."""
    from qwenvl_mcore.models.qwen3_vl_moe.config import flavor_hf_config

    real = flavor_hf_config("qwen3_vl_30b_a3b")
    deepstack = real["vision_config"]["deepstack_visual_indexes"]
    src = tiny.save_tiny_hf_checkpoint(
        tmp_path / "hf", seed=1, max_shard_size="2MB",
        text=dict(num_hidden_layers=real["text_config"]["num_hidden_layers"], num_experts=4, num_experts_per_tok=2),
        vision=dict(depth=real["vision_config"]["depth"], deepstack_visual_indexes=deepstack))
    expected = _released_30b_key_set()
    assert len(expected) == 882
    assert set(_tensors(src)) == expected
    _run("hf2mcore.py", "--hf", src, "--out", tmp_path / "mcore", "--procs", "2")
    _run("mcore2hf.py", "--mcore", tmp_path / "mcore", "--out", tmp_path / "back", "--max-shard-size", "2MB")
    _assert_bit_exact(_tensors(src), _tensors(tmp_path / "back"))


# -- bad inputs ------------------------------------------------------------------------------------------------
def _copy_hf(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _first_shard(d: Path) -> Path:
    return sorted(d.glob("model-*.safetensors"))[0]


def _rewrite_shard(path: Path, edit) -> None:
    with safe_open(path, "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _set_index(d: Path, edit) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    edit(index["weight_map"])
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _break_missing_shard(d: Path) -> None:
    _first_shard(d).unlink()


def _break_truncated(d: Path) -> None:
    shard = _first_shard(d)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])


def _break_missing_tensor(d: Path) -> None:
    name = "model.language_model.layers.1.mlp.gate.weight"
    shard = d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    _rewrite_shard(shard, lambda t: t.pop(name))
    _set_index(d, lambda m: m.pop(name))


def _break_unknown_tensor(d: Path) -> None:
    shard = _first_shard(d)
    _rewrite_shard(shard, lambda t: t.update({"model.visual.extra_head.weight": torch.zeros(3)}))
    _set_index(d, lambda m: m.update({"model.visual.extra_head.weight": shard.name}))


def _break_config(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 24  # the experts in the files are 40 wide
    (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("breaker, message", [
    (_break_missing_shard, "are missing"),
    (_break_truncated, "truncated"),
    (_break_missing_tensor, "model.language_model.layers.1.mlp.gate.weight"),
    (_break_unknown_tensor, "model.visual.extra_head.weight"),
    (_break_config, "do not fit the config"),
])
def test_bad_hf_input_fails_cleanly(hf, tmp_path, breaker, message):
    """Exit non-zero naming the problem; neither the output nor a staging directory is left behind."""
    src = _copy_hf(hf["released"], tmp_path / "hf")
    breaker(src)
    out = tmp_path / "mcore"
    proc = _run("hf2mcore.py", "--hf", src, "--out", out, expect_ok=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not Path(staging_dir_for(str(out))).exists()


def test_mcore_checkpoint_of_another_architecture_fails_cleanly(hf, converted, tmp_path):
    """Exporting a checkpoint with a config it does not fit lists the mismatching tensors and writes nothing."""
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((hf["released"] / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 24
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "hf"
    proc = _run("mcore2hf.py", "--mcore", converted["released"], "--out", out, "--config", other, expect_ok=False)
    assert proc.returncode != 0 and "does not fit the model config" in proc.stderr, proc.stderr[-3000:]
    assert "decoder.layers.mlp.experts.weight1: checkpoint [4, 8, 48, 2, 40], config [4, 8, 48, 2, 24]" in proc.stderr
    assert not out.exists() and not Path(staging_dir_for(str(out))).exists()


def test_existing_output_is_refused_without_overwrite(hf, converted, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _run("mcore2hf.py", "--mcore", converted["released"], "--out", out, expect_ok=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


class _Payload:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["crafted_metadata", "truncated_data"])
def test_mcore2hf_refuses_a_crafted_or_damaged_checkpoint(converted, tmp_path, damage):
    """A .metadata whose unpickling would run a command is refused naming the file and the global (the command
    does not run); a truncated data file is named; no output either way."""
    import pickle
    import shutil

    ckpt = tmp_path / "mcore"
    shutil.copytree(converted["released"], ckpt)
    marker = tmp_path / "PWNED"
    if damage == "crafted_metadata":
        (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
        expected = [f"{ckpt}/.metadata names posix.system", "refused"]
    else:
        data = sorted(ckpt.glob("*.distcp"))[-1]
        os.truncate(data, data.stat().st_size // 2)
        expected = [f"data file {data} is truncated"]
    out = tmp_path / "hf"
    proc = _run("mcore2hf.py", "--mcore", ckpt, "--out", out, expect_ok=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and all(e in proc.stderr for e in expected), proc.stderr[-3000:]
    assert not marker.exists()
    assert not out.exists() and not Path(staging_dir_for(str(out))).exists()


def test_truncation_is_found_from_the_header_alone(tmp_path):
    """The header check catches a file cut anywhere in its data, without reading the tensors."""
    from qwenvl_mcore.conversion.hf_io import HFCheckpointError, read_safetensors_header

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(10.0), "b": torch.ones(3, 4)}, path)
    assert {k: v.shape for k, v in read_safetensors_header(path).items()} == {"a": (10,), "b": (3, 4)}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (len(data) - 1, 8 + n + 4, 8 + n - 2, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(HFCheckpointError, match="truncated|corrupt"):
            read_safetensors_header(path)
