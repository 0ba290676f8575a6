"""`sbatch launch/convert.sh hf2mcore ...` then `mcore2hf` on a real Slurm: both jobs COMPLETED and the round trip
is bit-exact (every tensor's key, dtype, shape and bytes), with no process of either job left behind."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from harness import start_cluster
from jobs import FINISHED, job_info, leftover_processes, sbatch, wait_for


@pytest.fixture(scope="module")
def cluster(slurm_programs, tmp_path_factory, reference):
    # `reference` only to start the uninterrupted run now: it trains while the conversions run.
    yield from start_cluster("linuxproc", tmp_path_factory.mktemp("slurm_convert"))


def _tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _convert(cluster, work, *args) -> None:
    out = work / f"{args[0]}.out"
    job = sbatch(cluster, f"--output={out}", "launch/convert.sh", *args, "--no-progress")
    info = wait_for(lambda: (i := job_info(cluster, job)).get("JobState") in FINISHED and i, 300,
                    f"convert job {job}", interval=0.5, log=out)
    text = out.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-4000:]}"
    assert not leftover_processes(cluster, job), "processes of the conversion job remain"


def test_convert_round_trip_under_sbatch(cluster, tmp_path):
    from qwenvl_mcore.testing import tiny

    hf = tiny.save_tiny_hf_checkpoint(tmp_path / "hf", seed=7, expert_layout="released")
    _convert(cluster, tmp_path, "hf2mcore", "--hf", str(hf), "--out", str(tmp_path / "mcore"))
    _convert(cluster, tmp_path, "mcore2hf", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "back"))
    a, b = _tensors(hf), _tensors(tmp_path / "back")
    assert a and set(a) == set(b), sorted(set(a) ^ set(b))
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, bad
