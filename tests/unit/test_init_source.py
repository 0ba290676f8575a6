"""What model.init_from names (checkpoint/model_io.py: init_source), the LoRA base hash of an HF directory
(lora/training.py) and the row reads that let each rank read only its shard's bytes (conversion/hf_io.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

from qwenvl_mcore.checkpoint import model_io
from qwenvl_mcore.conversion import hf_io
from qwenvl_mcore.lora import training as lora_training
from qwenvl_mcore.testing import tiny


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return tiny.save_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "hf", seed=0)


def test_init_source_tells_checkpoints_from_hf_dirs(hf, tmp_path):
    assert model_io.init_source(str(hf)) == model_io.InitSource(model_io.HF_MODEL, str(hf))
    assert model_io.init_source(str(hf)).hf_dir == str(hf)
    step = tmp_path / "run" / "checkpoints" / "step_0000004"
    step.mkdir(parents=True)
    (step / model_io.META_FILE).write_text("{}")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000004\n")
    for given in (step, tmp_path / "run" / "checkpoints", tmp_path / "run"):
        source = model_io.init_source(str(given))
        assert source == model_io.InitSource(model_io.CHECKPOINT, str(step))
        assert source.hf_dir == str(step / "hf")


@pytest.mark.parametrize("make, found", [
    (lambda d: None, "no such directory"),
    (lambda d: d.mkdir(), "it holds neither"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"), (d / "pytorch_model.bin").write_bytes(b"x")),
     "it has config.json but only pytorch_model.bin: only safetensors HF checkpoints are read"),
    (lambda d: (d.mkdir(), (d / "model.safetensors").write_bytes(b"x")), "safetensors files but no config.json"),
    (lambda d: (d.mkdir(), (d / "checkpoints").mkdir()), "training run directory without a complete checkpoint"),
], ids=["missing", "empty", "bin_weights", "no_config", "run_without_checkpoint"])
def test_init_source_names_what_was_expected(tmp_path, make, found):
    d = tmp_path / "x"
    make(d)
    with pytest.raises(model_io.CheckpointError) as e:
        model_io.init_source(str(d))
    assert found in str(e.value)
    assert f"model.init_from={d}" in str(e.value)
    assert "expected a qwenvl-mcore checkpoint" in str(e.value) and "or an HF model directory" in str(e.value)


def test_hf_base_hash_identity(hf, tmp_path):
    """Deterministic; a moved copy or the same weights in other shard files keep it; other weights change it."""
    ref = lora_training.base_reference(str(hf))
    assert ref == {"path": str(hf.resolve()), "hash": lora_training.base_hash(str(hf))}
    moved = shutil.copytree(hf, tmp_path / "moved")
    assert lora_training.base_hash(str(moved)) == ref["hash"]
    resharded = tiny.save_tiny_hf_checkpoint(tmp_path / "resharded", seed=0, max_shard_size="1MB")
    assert len(list(resharded.glob("*.safetensors"))) != len(list(hf.glob("*.safetensors")))
    assert lora_training.base_hash(str(resharded)) == ref["hash"]
    other = tiny.save_tiny_hf_checkpoint(tmp_path / "other", seed=1)
    assert lora_training.base_hash(str(other)) != ref["hash"]


def test_rows_read_only_their_bytes(hf):
    reader = hf_io.SafetensorsReader(hf)
    name = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    whole = reader.get(name)
    assert whole.shape[0] == 8
    for start, stop in ((0, 4), (4, 8), (2, 3), (5, 5)):
        assert torch.equal(reader.get_rows(name, start, stop), whole[start:stop])
    with pytest.raises(ValueError):
        reader.get_rows(name, 6, 9)


@pytest.mark.parametrize("override, message", [
    ("checkpoint.save_hf=always", "checkpoint.save_hf='always': choose one of none, every, final"),
    ("checkpoint.hf_max_shard_size=5XB", "checkpoint.hf_max_shard_size: max shard size '5XB'"),
    ("checkpoint.hf_max_shard_size=0", "checkpoint.hf_max_shard_size: max shard size '0'"),
])
def test_save_hf_settings_are_checked_at_start(override, message):
    from qwenvl_mcore.training.config import ConfigError, compose

    assert compose(["checkpoint.save_hf=final", "checkpoint.hf_max_shard_size=500MB"]).checkpoint.save_hf == "final"
    with pytest.raises(ConfigError) as e:
        compose([override])
    assert message in str(e.value)
