"""The training entry point speaks Hydra's command-line conventions: `--cfg job` prints what `--print-config` prints,
`--help` lists every config group of conf/ with its options, and neither changes the configuration or the exit
codes (a bad override still exits 2 with the same message)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_mcore import train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

# One interpreter runs main() for every argv (each fresh process costs seconds of imports); main() installs signal
# handlers and library warning filters, which must not leak into pytest's own process.
DRIVER = """
import contextlib, io, json, sys, tempfile
from qwenvl_mcore.train import main
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with tempfile.TemporaryFile("w+") as err:  # a real file: main() hands stderr's descriptor to faulthandler
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        err.seek(0)
        results.append({"rc": rc, "out": out.getvalue(), "err": err.read()})
print("RESULTS " + json.dumps(results))
"""


def run_main(argvs: list[list[str]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_cfg_job_prints_what_print_config_prints_and_bad_input_still_exits_2():
    experiments = [["experiment=debug_cpu_tp2_ep2"], ["experiment=sft_30b_a3b_2x8xh100", "optim.lr=5e-6"], []]
    argvs = []
    for overrides in experiments:
        argvs += [["--print-config", *overrides], ["--cfg", "job", *overrides], [*overrides, "--cfg=job"],
                  ["-c", "job", "--resolve", *overrides]]
    bad = [["--cfg", "job", "optim.lrr=1"], ["--print-config", "optim.lrr=1"], ["--cfg", "hydra"], ["--cfg"]]
    results = run_main(argvs + [*bad])
    for k, overrides in enumerate(experiments):
        printed = results[4 * k: 4 * k + 4]
        assert all(r["rc"] == 0 for r in printed), printed
        assert printed[0]["out"].startswith("model:\n") and "\ncheckpoint:\n" in printed[0]["out"]
        assert "${" not in printed[0]["out"]  # resolved
        for other in printed[1:]:
            assert other["out"] == printed[0]["out"]
    assert "name: sft_30b_a3b_2x8xh100" in results[4]["out"] and "lr: 5.0e-06" in results[4]["out"]
    cfg_bad, print_bad, hydra, bare = results[-4:]
    assert cfg_bad["rc"] == print_bad["rc"] == 2 and cfg_bad["out"] == print_bad["out"] == ""
    assert cfg_bad["err"] == print_bad["err"] and "Key 'lrr' not in 'OptimConf'" in cfg_bad["err"]
    assert hydra["rc"] == bare["rc"] == 2 and "only `--cfg job`" in hydra["err"] and "only `--cfg job`" in bare["err"]


def test_cfg_job_through_the_module_exits_like_print_config():
    args = [sys.executable, "-m", "qwenvl_mcore.train", "experiment=debug_cpu_tp2_ep2", "checkpoint.every=7"]
    cfg = subprocess.run(args + ["--cfg", "job"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    bad = subprocess.run(args + ["--cfg", "job", "optim.lrr=1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert cfg.returncode == 0 and "  every: 7\n" in cfg.stdout, cfg.stderr[-2000:]
    assert bad.returncode == 2 and "optim.lrr" in bad.stderr and bad.stdout == ""


def test_help_lists_every_group_and_option(capsys):
    assert train.main(["--help"]) == 0  # returns before any handler or import with side effects
    out = capsys.readouterr().out
    groups = {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in CONF.iterdir() if d.is_dir()}
    assert {"model", "parallel", "optim", "data", "checkpoint", "logging", "peft", "experiment"} <= set(groups)
    listed = {}
    for line in out.split("== Configuration groups ==")[1].splitlines():
        if ": " in line and not line.startswith(" "):
            name, options = line.split(": ", 1)
            listed[name] = options.split("  (default:")[0].split(", ")
    assert listed == groups
    assert "model: debug, qwen3_vl_235b_a22b, qwen3_vl_30b_a3b  (default: debug)" in out
    for flag in ("--print-config", "--cfg job", "--help", "Exit status"):
        assert flag in out
    assert train.main(["optim.lrr=1", "-h"]) == 0 and capsys.readouterr().out == out


@pytest.mark.parametrize("argv, expected", [
    (["--print-config", "a=1"], (True, ["a=1"])),
    (["a=1", "--cfg", "job", "b=2"], (True, ["a=1", "b=2"])),
    (["--cfg=job", "--resolve"], (True, [])),
    (["-c", "job"], (True, [])),
    (["a=1"], (False, ["a=1"])),
])
def test_flags_are_split_from_overrides(argv, expected):
    assert train.split_flags(argv) == expected
