"""The converters and the demo never destroy what they were given (issue 16): an output overlapping an input is
refused, --overwrite removes only the old output, killed conversions leave no worker behind and a rerun
succeeds, a second conversion to one output is refused naming the first, a training run directory is accepted,
bad arguments and headers give `error:` lines, outputs get normal file modes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qwenvl_mcore.checkpoint import locking
from qwenvl_mcore.checkpoint.model_io import STAGING_MARKER, staging_dir_for
from qwenvl_mcore.conversion.convert import hf_to_mcore, mcore_to_hf, run_cli
from qwenvl_mcore.testing import tiny

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _normal_modes(d: Path) -> list[str]:
    """Paths under `d` (itself included) whose mode is not what the umask gives a new file or directory."""
    mask = os.umask(0)
    os.umask(mask)
    bad = []
    for p in [d, *d.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        if stat.S_IMODE(p.stat().st_mode) != want:
            bad.append(f"{p.relative_to(d)}: {oct(stat.S_IMODE(p.stat().st_mode))}")
    return bad


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return tiny.save_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", seed=7, expert_layout="released")


@pytest.fixture(scope="module")
def mcore(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore") / "tiny"
    hf_to_mcore(str(hf), str(out), progress=False)
    return out


def _trainer_dir(mcore: Path, run: Path) -> Path:
    """A training run directory as the trainer leaves it: checkpoints/step_N, checkpoints/latest, logs."""
    shutil.copytree(mcore, run / "checkpoints" / "step_0000003")
    (run / "checkpoints" / "latest").write_text("step_0000003\n")
    (run / "logs").mkdir()
    (run / "logs" / "metrics.jsonl").write_text("{}\n")
    return run


# -- item 3: outputs overlapping inputs, --overwrite --------------------------------------------------------------
def test_output_overlapping_an_input_is_refused_and_nothing_is_deleted(hf, mcore, tmp_path, capsys):
    run = _trainer_dir(mcore, tmp_path / "run")
    models = tmp_path / "models"
    shutil.copytree(hf, models / "X")
    (tmp_path / "link").symlink_to(models / "X")
    before = {d: _snapshot(d) for d in (run, models)}
    cases = [
        (mcore_to_hf, dict(mcore=str(run / "checkpoints"), out=str(run))),          # the output contains the input
        (mcore_to_hf, dict(mcore=str(run), out=str(run / "checkpoints"))),          # equal to the resolved save dir
        (mcore_to_hf, dict(mcore=str(run / "checkpoints"), out=str(run / "checkpoints" / "step_0000003" / "x"))),
        (mcore_to_hf, dict(mcore=str(run), out=str(models), config_dir=str(models / "X"))),  # contains --config
        (hf_to_mcore, dict(hf_dir=str(models / "X"), out=str(models))),            # the example
        (hf_to_mcore, dict(hf_dir=str(models / "X"), out=str(models / "X" / "mcore"))),
        (hf_to_mcore, dict(hf_dir=str(models / "X"), out=str(tmp_path / "link"))),  # the same through a symlink
    ]
    for convert, kwargs in cases:
        assert run_cli(convert, overwrite=True, progress=False, **kwargs) == 1, kwargs
        err = capsys.readouterr().err
        assert err.startswith("error: output ") and "overlaps the input" in err, (kwargs, err)
    assert {d: _snapshot(d) for d in (run, models)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "models", "run"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "logs"]


def test_overwrite_replaces_only_the_old_output(mcore, tmp_path):
    """An existing sibling OUT.old (the user's) survives --overwrite; no temporary sibling is left behind."""
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    (tmp_path / "export.old").mkdir()
    (tmp_path / "export.old" / "mine.txt").write_text("keep me")
    mcore_to_hf(str(mcore), str(out), overwrite=True, progress=False)
    assert (tmp_path / "export.old" / "mine.txt").read_text() == "keep me"
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not (out / STAGING_MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.old"]
    assert _normal_modes(out) == []  # item 16: safetensors and the directory get the umask's modes, not 0600/0700
    assert _normal_modes(mcore) == []  # and hf2mcore's output too


def test_staging_directory_not_made_by_us_is_refused(mcore, tmp_path, capsys):
    out = tmp_path / "export"
    foreign = Path(staging_dir_for(str(out)))
    foreign.mkdir()
    (foreign / "data.bin").write_text("someone's")
    assert run_cli(mcore_to_hf, mcore=str(mcore), out=str(out), progress=False) == 1
    assert "was not made by qwenvl-mcore" in capsys.readouterr().err
    assert (foreign / "data.bin").read_text() == "someone's" and not out.exists()


# -- items 4 and 6: killed conversions, concurrent conversions ------------------------------------------------
def _workers(proc: psutil.Process) -> list[psutil.Process]:
    out = []
    for child in proc.children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()) and "resource_tracker" not in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def _freeze_past_start_up(parent: psutil.Process, deadline: float) -> list[psutil.Process]:
    """The converter's 2 workers, stopped (SIGSTOP) once each holds a TCP socket, i.e. has started its process
    group, which the launcher does only after its start-up (die_with_parent): they are frozen mid-conversion.
    Each is run in 50 ms slices until then, so a fast one cannot finish first."""
    seen: dict[int, psutil.Process] = {}
    ready: set[int] = set()
    while time.time() < deadline and (len(seen) < 2 or len(ready) < 2):
        for w in _workers(parent):
            if w.pid not in seen:
                w.suspend()
                seen[w.pid] = w
        for pid, w in seen.items():
            if pid in ready:
                continue
            if w.net_connections(kind="tcp"):
                ready.add(pid)
                continue
            w.resume()
            time.sleep(0.05)
            w.suspend()
        time.sleep(0.01)
    return [seen[pid] for pid in ready]


def _gone(pids: list[int], timeout: float) -> list[int]:
    """Those of `pids` still alive (not zombies) after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_conversion_leaves_no_worker_and_a_rerun_succeeds(mcore, tmp_path, sig):
    """mcore2hf --procs 2 killed while both workers are frozen mid-conversion (stopped after their start-up, as
    if stuck in I/O): the workers die with it, and the same command run again succeeds.
    SIGTERM also removes the staging directory and exits 143. The converter runs with SIGINT ignored, as any
    background job of a batch script does (`cmd &` without job control): torch's own parent-death signal for
    its workers is SIGINT, which then does nothing."""
    out = tmp_path / "export"
    cmd = [sys.executable, str(ROOT / "tools/convert/mcore2hf.py"), "--mcore", str(mcore), "--out", str(out),
           "--procs", "2", "--max-shard-size", "300KB", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    workers = []
    try:
        workers = _freeze_past_start_up(psutil.Process(proc.pid), time.time() + 240)
        assert proc.poll() is None and len(workers) == 2, "the workers never started their process group"
        assert Path(staging_dir_for(str(out))).is_dir()
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        assert _gone([w.pid for w in workers], timeout=5) == [], "workers outlived the converter"
        if sig == signal.SIGTERM:
            assert code == 143 and "error: stopped by SIGTERM; nothing was written" in proc.stderr.read()
            assert not Path(staging_dir_for(str(out))).exists() and not Path(locking.lock_path_for(str(out))).exists()
    finally:
        for w in workers:  # only if the check above failed: leave no stopped process behind
            try:
                w.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert not Path(staging_dir_for(str(out))).exists()


def test_second_conversion_to_one_output_is_refused_naming_the_first(hf, tmp_path, capsys):
    out = tmp_path / "mcore"
    with locking.PathLock(locking.lock_path_for(str(out)), target=str(out)):  # a conversion to `out` is running
        assert run_cli(hf_to_mcore, hf_dir=str(hf), out=str(out), progress=False) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} is in use by another process (pid {os.getpid()} on ") and "Traceback" not in err
    assert not out.exists() and not Path(staging_dir_for(str(out))).exists()


# -- item 12: a training run directory ---------------------------------------------------------------------------
def test_mcore2hf_accepts_a_trainer_dir(mcore, tmp_path, capsys):
    run = _trainer_dir(mcore, tmp_path / "run")
    out = tmp_path / "export"
    assert _tool("mcore2hf")(["--mcore", str(run), "--out", str(out), "--no-progress",
                              "--max-shard-size", "5GiB"]) == 0  # item 15: binary units as transformers takes them
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tensors"] == 104 and (out / "model.safetensors").is_file()
    (run / "checkpoints" / "latest").write_text("step_0000009\n")
    assert run_cli(mcore_to_hf, mcore=str(run), out=str(tmp_path / "x"), progress=False) == 1
    assert "latest names step_0000009, which does not exist" in capsys.readouterr().err
    (run / "checkpoints" / "latest").unlink()
    assert run_cli(mcore_to_hf, mcore=str(run), out=str(tmp_path / "x"), progress=False) == 1
    assert "training run directory without a complete checkpoint" in capsys.readouterr().err


# -- item 15: bad arguments and headers ------------------------------------------------------------------------
@pytest.mark.parametrize("tool, extra, message", [
    ("mcore2hf", ["--max-shard-size", "5XB"], "--max-shard-size: max shard size '5XB'"),
    ("mcore2hf", ["--max-shard-size", "0"], "use a positive number of bytes"),
    ("mcore2hf", ["--procs", "0"], "--procs 0: the number of processes must be at least 1"),
    ("hf2mcore", ["--procs", "-2"], "--procs -2: the number of processes must be at least 1"),
    ("mcore2hf", ["--config", "/nonexistent/config"], "/nonexistent/config"),
])
def test_bad_arguments_give_an_error_line(hf, mcore, tmp_path, capsys, tool, extra, message):
    src = ["--mcore", str(mcore)] if tool == "mcore2hf" else ["--hf", str(hf)]
    out = tmp_path / "out"
    assert _tool(tool)([*src, "--out", str(out), "--no-progress", *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists() and not Path(staging_dir_for(str(out))).exists()


def test_bad_paths_give_an_error_line(hf, mcore, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a model")
    bad_json = tmp_path / "config.json"
    bad_json.write_text("{bad")
    cases = [
        ("hf2mcore", ["--hf", str(afile), "--out", str(tmp_path / "o")], f"--hf {afile}: not a directory"),
        ("mcore2hf", ["--mcore", str(mcore), "--config", str(bad_json), "--out", str(tmp_path / "o")],
         f"{bad_json}: not a JSON config"),
        ("mcore2hf", ["--mcore", str(mcore), "--out", str(afile / "sub")], str(afile)),  # cannot be created
    ]
    for tool, args, message in cases:
        assert _tool(tool)([*args, "--no-progress"]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert afile.read_text() == "not a model" and not (tmp_path / "o").exists()


def test_header_whose_offsets_disagree_with_the_shape_names_file_and_tensor(hf, tmp_path, capsys):
    src = tmp_path / "hf"
    shutil.copytree(hf, src)
    shard = sorted(src.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[name]["data_offsets"][1] -= 4  # shape and file size still fit: only the tensor's byte span is wrong
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n:])
    assert _tool("hf2mcore")(["--hf", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shard}: corrupt safetensors header: tensor {name} has data_offsets"), err


# -- item 17: the demo's --out -----------------------------------------------------------------------------------
def test_demo_deletes_only_its_own_output(tmp_path, monkeypatch):
    """A non-empty directory the demo did not make, the checkout and its parents are refused with nothing deleted;
    a previous demo output is replaced. (The demo's work is stubbed out after it claims its directory.)"""
    from qwenvl_mcore import demo, library_noise
    from qwenvl_mcore.models.qwen3_vl_moe import debug_checkpoint

    class Claimed(Exception):
        pass

    def stop(path, **kwargs):
        raise Claimed(path)

    checkout = tmp_path / "home" / "checkout"
    (checkout / "qwenvl_mcore").mkdir(parents=True)
    (checkout / "README.md").write_text("mine")
    monkeypatch.setattr(demo, "ROOT", checkout)
    monkeypatch.setattr(debug_checkpoint, "save_tiny_hf_checkpoint", stop)  # where demo.main imports it from
    monkeypatch.setattr(library_noise, "install", lambda: None)  # process-wide: not for this pytest process
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for target in (mine, checkout, checkout.parent):
        with pytest.raises(SystemExit) as e:
            demo.main(["--out", str(target)])
        assert str(e.value.code).startswith("error: --out "), e.value.code
    assert (mine / "thesis.tex").read_text() == "years of work" and (checkout / "README.md").read_text() == "mine"
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    previous = tmp_path / "demo"
    for _ in range(2):  # fresh, then a previous demo output (marked) replaced
        with pytest.raises(Claimed):
            demo.main(["--out", str(previous)])
        assert sorted(p.name for p in previous.iterdir()) == [demo.MARKER]
        (previous / "train.log").write_text("from the last run")
