"""Checkpoint pickles are read through allow-lists (checkpoint/safe_unpickle.py): a checkpoint written here loads,
every crafted pickle (DCP .metadata, a stored object, a legacy common.pt) is refused with a CheckpointError naming
the file and the global before anything runs, and damaged files are named. The save directory (manager.py): stale
staging is removed by name only, and publishing a step directory never leaves `latest` naming a missing one.
One process, no process group."""

from __future__ import annotations

import io
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from qwenvl_mcore.checkpoint import dcp
from qwenvl_mcore.checkpoint.model_io import CheckpointError

COMMON = {"training": {"trainer": {"step": 3}, "layout": {"tp": 1}, "betas": (0.9, 0.95)}, "numpy": np.arange(3)}


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def ckpt(tmp_path) -> str:
    """A small torch_dist checkpoint (two tensors, one in two chunks, and megatron's common state)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    a, b = torch.arange(12.0).reshape(3, 4), torch.ones(5, dtype=torch.bfloat16)
    chunks = [(dcp.Chunk("a", (3, 4), torch.float32, (0, 0), (2, 4)), lambda: a[:2]),
              (dcp.Chunk("a", (3, 4), torch.float32, (2, 0), (1, 4)), lambda: a[2:]),
              (dcp.Chunk("b", (5,), torch.bfloat16, (0,), (5,)), lambda: b)]
    dcp.write_chunks(str(out), chunks, common=COMMON)
    return str(out)


def _load_common(path: str):
    from megatron.core import dist_checkpointing

    from qwenvl_mcore.checkpoint import safe_unpickle

    safe_unpickle.install()
    with safe_unpickle.checkpoint_errors(path):
        return dist_checkpointing.load_common_state_dict(path)


def test_a_checkpoint_written_here_reads_back(ckpt):
    meta = dcp.tensor_metadata(ckpt)
    assert {k: tuple(v.size) for k, v in meta.items()} == {"a": (3, 4), "b": (5,)}
    (a,) = dcp.read_regions(ckpt, [("a", (1, 0), (2, 4), torch.float32)])
    assert torch.equal(a, torch.arange(4.0, 12.0).reshape(2, 4))
    common = _load_common(ckpt)
    assert common["training"] == COMMON["training"] and np.array_equal(common["numpy"], COMMON["numpy"])


def test_the_rng_state_passes_the_object_allow_list():
    from qwenvl_mcore.checkpoint.safe_unpickle import load_object

    buf = io.BytesIO()
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": (3, (1, 2), None)}
    torch.save(state, buf)
    back = load_object(buf.getvalue(), "rng")
    assert torch.equal(back["torch"], state["torch"]) and back["numpy"][0] == "MT19937"
    assert np.array_equal(back["numpy"][1], state["numpy"][1]) and back["numpy"][1].dtype == np.uint32


def test_crafted_metadata_is_refused_not_run(ckpt, tmp_path):
    marker = tmp_path / "PWNED"
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)
    for read in (dcp.tensor_metadata, _load_common):
        with pytest.raises(CheckpointError, match=r"\.metadata names posix\.system.*refused"):
            read(ckpt)
    assert not marker.exists()


def test_crafted_stored_object_is_refused_not_run(ckpt, tmp_path):
    """The common state replaced by a crafted torch.save blob (in a data file of its own)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    marker = tmp_path / "PWNED"
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        md = pickle.load(f)
    buf = io.BytesIO()
    torch.save([Payload(marker)], buf)
    with open(os.path.join(ckpt, "__crafted.distcp"), "wb") as f:
        f.write(buf.getvalue())
    (index,) = [i for i in md.storage_data if i.fqn == dcp.COMMON_STATE_KEY]
    md.storage_data[index] = _StorageInfo("__crafted.distcp", 0, len(buf.getvalue()))
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CheckpointError, match=r"__crafted\.distcp \(object common_state/shard_0_1\) names "
                                              r"posix\.system.*refused"):
        _load_common(ckpt)
    assert not marker.exists()


def test_crafted_legacy_common_pt_is_refused_not_run(ckpt, tmp_path):
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), os.path.join(ckpt, "common.pt"))
    with pytest.raises(CheckpointError, match=r"common\.pt names posix\.system.*refused"):
        _load_common(ckpt)
    assert not marker.exists()


def test_damaged_files_are_named(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / "good")
    data = sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))
    os.truncate(os.path.join(ckpt, data[0]), 10)
    with pytest.raises(CheckpointError, match=f"data file .*{data[0]} is truncated"):
        dcp.tensor_metadata(ckpt)
    os.remove(os.path.join(ckpt, data[0]))
    with pytest.raises(CheckpointError, match=f"data file {data[0]} is missing"):
        dcp.tensor_metadata(ckpt)
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(b"garbage" * 10)
    with pytest.raises(CheckpointError, match=r"\.metadata is damaged"):
        dcp.tensor_metadata(ckpt)
    os.remove(os.path.join(ckpt, ".metadata"))
    with pytest.raises(CheckpointError, match=r"has no \.metadata"):
        dcp.tensor_metadata(ckpt)


def test_data_file_outside_the_checkpoint_is_refused(ckpt, tmp_path):
    """A metadata naming `../x` would read another file: refused before any read."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    (tmp_path / "secret").write_bytes(b"x" * 1000)
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        md = pickle.load(f)
    index = next(iter(md.storage_data))
    md.storage_data[index] = _StorageInfo("../secret", 0, 10)
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        dcp.tensor_metadata(ckpt)


def test_stale_staging_is_removed_and_nothing_else(tmp_path):
    from qwenvl_mcore.checkpoint import manager

    names = [".step_0000007.incomplete", ".step_0000001.old-12-0a1b2c3d", "step_0000001", ".step_x.incomplete",
             "step_0000002.incomplete", ".other.incomplete", "latest"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / ".step_0000009.incomplete")
    assert manager.remove_stale_staging(str(tmp_path)) == [".step_0000001.old-12-0a1b2c3d",
                                                           ".step_0000007.incomplete"]
    assert sorted(os.listdir(tmp_path)) == sorted([*names[2:], "target", ".step_0000009.incomplete"])


@pytest.mark.parametrize("steps, replaced, during", [((1, 2), 2, "step_0000001"), ((2, 5), 2, "step_0000005"),
                                                      ((2,), 2, None)], ids=["older", "newer_only", "alone"])
def test_replacing_the_step_latest_names_never_leaves_it_dangling(tmp_path, monkeypatch, steps, replaced, during):
    """`latest` names step `replaced`, which a new save replaces: after every rename it names an existing directory
    (during the swap: another step directory, the newest older one first; none existing: no `latest`), and
    finally the new step directory."""
    from qwenvl_mcore.checkpoint import manager

    root = tmp_path / "checkpoints"
    for s in steps:
        (root / f"step_{s:07d}").mkdir(parents=True)
        (root / f"step_{s:07d}" / "old").write_text("old")
    (root / "latest").write_text(f"step_{replaced:07d}\n")
    staging = root / f".step_{replaced:07d}.incomplete"
    staging.mkdir()
    (staging / "new").write_text("new")
    seen = []
    real_rename = os.rename

    def watching_rename(src, dst):
        real_rename(src, dst)
        named = (root / "latest").read_text().strip() if (root / "latest").exists() else None
        seen.append((named, named is None or (root / named).is_dir()))

    monkeypatch.setattr(os, "rename", watching_rename)
    manager._publish(str(root), str(staging), str(root / f"step_{replaced:07d}"))
    assert seen and all(ok for _, ok in seen), seen
    assert {named for named, _ in seen[:-1]} == {during}, seen
    assert (root / "latest").read_text().strip() == f"step_{replaced:07d}"
    assert sorted(os.listdir(root / f"step_{replaced:07d}")) == ["new"]
    assert sorted(os.listdir(root)) == ["latest", *(f"step_{s:07d}" for s in steps)]
