"""The main job's embedded default, on the CPU: make a tiny Qwen3-VL MoE checkpoint in HF format (random weights,
local tokenizer and processor), then run it through our megatron model at TP2 x EP2 (sequence parallel) on gloo
ranks next to transformers, and print the parity figures. (Training, conversion and export join this job as the
trainer and converters land.)"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    from qwenvl_mcore.testing import tiny

    out = Path(tempfile.mkdtemp(prefix="qwenvl-demo-"))
    t0 = time.time()
    hf_dir = tiny.save_tiny_hf_checkpoint(out / "hf", seed=0)
    print(f"[demo] tiny HF checkpoint (released expert layout): {hf_dir}")
    verify = Path(__file__).resolve().parents[1] / "tools" / "convert" / "verify.py"
    proc = subprocess.run([sys.executable, str(verify), "--hf", str(hf_dir), "--tp", "2", "--ep", "2"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = report["max_abs_logit_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    print(f"[demo] TP2 x EP2 (SP) vs transformers on text+image+video: max|dlogit|={report['max_abs_logit_diff']:.2e} "
          f"cosine={report['logit_cosine']:.7f} top1={report['top1_agreement']:.3f} -> {'OK' if ok else 'MISMATCH'}")
    print(f"[demo] done in {time.time() - t0:.0f}s; outputs in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
