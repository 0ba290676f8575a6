"""Fixtures of the real-Slurm tests: the installed programs and the one uninterrupted reference run whose
per-step losses every interrupted run is compared with. Clusters are module fixtures (harness.start_cluster):
only one runs at a time (Slurm's fixed ports), so each module starts its own, and a parametrized module runs its
variants one after the other (pytest finishes a module-scoped fixture's value before it makes the next one)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cluster import missing_programs  # noqa: E402
from harness import CGROUP_SKIPPED, ReferenceRun  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    for reason in CGROUP_SKIPPED:
        terminalreporter.write_line(f"tests/slurm: proctrack/cgroup NOT tested on this machine: {reason}",
                                    yellow=True)


@pytest.fixture(scope="session")
def slurm_programs():
    """Fails (never skips) when Slurm or munge is missing: CI must not pass without having run these tests."""
    missing = missing_programs()
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge "
                    "(`make test` runs tests/slurm/ensure_slurm.sh, which does it as root)", pytrace=False)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted run of test_stop_requeue's configuration, started when first requested (the conversion
    tests request it so that it trains while they run). QW_SLURM_TEST_REFERENCE_DIR=<trainer.dir of a finished
    reference run> reuses that one instead (by hand, while iterating on the launch scripts: stale after any change
    to the model or the trainer's numerics)."""
    from scenario import OVERRIDES

    reuse = os.environ.get("QW_SLURM_TEST_REFERENCE_DIR")
    run = ReferenceRun(OVERRIDES, tmp_path_factory.mktemp("reference") / "run",
                       reuse=Path(reuse) if reuse else None)
    yield run
    run.stop()
