"""The README's table of presets is what the planner says today (tools/plan_memory.py --presets)."""

from __future__ import annotations

import importlib.util
import io
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_presets_table_is_the_planners():
    spec = importlib.util.spec_from_file_location("plan_memory", ROOT / "tools" / "plan_memory.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["--presets"]) == 0  # every preset fits
    table = out.getvalue().strip()
    names = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if not p.stem.startswith("debug"))
    rows = [line for line in table.splitlines()[2:]]
    assert [r.split("`")[1] for r in rows] == names  # every real-GPU preset has its row
    assert "| `lora_235b_a22b_1x8xh100` | Qwen3-VL-235B-A22B | 8 x 80 GiB |" in table
    assert table in (ROOT / "README.md").read_text(), (
        "README.md's table of presets differs from the planner's: paste the output of "
        "`.venv/bin/python tools/plan_memory.py --presets` into it\n" + table)
