"""qwenvl_mcore/library_noise.py: only the listed library notices are hidden, each recorded once; everything else
is shown as before. Each check runs in a fresh interpreter, since install() changes process-wide hooks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from qwenvl_mcore import library_noise

SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from qwenvl_mcore import library_noise
    library_noise.install()
    for _ in range(3):  # one place, warned three times: recorded once
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
    warnings.warn("a real warning of ours")
    warnings.warn("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed")  # not from cpu_compat
    ext = logging.getLogger("torch.utils.cpp_extension")
    ext.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
    ext.warning("a real log record")
    library_noise.write_to(sys.argv[1])
    warnings.warn("full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.")
""")


def test_only_known_notices_are_hidden_and_logged_once(tmp_path):
    log = tmp_path / "logs" / "library_warnings.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "a real warning of ours" in proc.stderr and "a real log record" in proc.stderr
    assert "not a leaf Tensor" in proc.stderr  # known only when raised from cpu_compat.py
    for notice in ("Transformer Engine and Apex", "No CUDA runtime", "full scope is deprecated"):
        assert notice not in proc.stderr, proc.stderr
    lines = log.read_text().splitlines()[1:]
    assert len(lines) == 3, lines
    assert "Transformer Engine and Apex" in lines[0] and "No CUDA runtime" in lines[1]
    assert "full scope is deprecated" in lines[2]  # recorded after write_to: appended


def test_everything_is_shown_when_asked(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "w.log")], capture_output=True, text=True,
                          timeout=120, env={"QWENVL_SHOW_LIBRARY_WARNINGS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "Transformer Engine and Apex" in proc.stderr and "No CUDA runtime" in proc.stderr


def test_known_list_is_specific():
    assert library_noise.is_known("UserWarning: Apex is not installed. Falling back to Torch Norm")
    assert not library_noise.is_known("Apex is not installed")  # only the exact notices
    assert not library_noise.is_known("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
                                      "/work/model.py")
