#!/usr/bin/env bash
# Every GPU measurement behind docs/performance.md, on one GPU, in one go: each stage's full log and JSON go to DIR,
# its summary to stdout.
#
#   tools/bench/run_all.sh DIR [checks] [parity] [experts] [step] [trainer]     (no stage named: all of them)
#
#   checks   tools/bench/gpu_checks.py: varlen attention and grouped-GEMM experts against references (bf16)
#   parity   tools/bench/train_step.py on the debug model, fp32 and bf16: our first-step loss against transformers
#   experts  tools/bench/experts.py: grouped GEMM against the loop at the 30B and 235B expert shapes
#   step     tools/bench/train_step.py at the real widths (LAYERS LLM layers, default 4) against transformers
#   trainer  the trainer itself on this GPU (launch/local.sh, bf16, debug model): 6 steps straight, and 3 + resume
#            to 6; prints both runs' losses and their largest difference
# PYTHON picks the interpreter (default: the checkout's .venv, else python3); STAGE_TIMEOUT limits each stage (s).
# Issue 20's measurements (goal table, parts with and without DDP accumulation, GPU busy, host syncs) in one run of
# about 8 minutes, with how to run it through the device tool: tools/bench/gpu_session.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
out=${1:?usage: tools/bench/run_all.sh DIR [checks] [parity] [experts] [step] [trainer]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
stages=("$@")
((${#stages[@]})) || stages=(checks parity experts step trainer)
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
export PYTHON PYTHONUNBUFFERED=1
failed=()

stage() { # name command...: run, keep the whole log, show its last lines (tables come last)
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    timeout "${STAGE_TIMEOUT:-3600}" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep -v -i -e warn -e '^\s*$' "$out/$name.log" | tail -n 14
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    ((rc == 0)) || failed+=("$name")
}

for s in "${stages[@]}"; do
    case $s in
        checks) stage checks "$PYTHON" tools/bench/gpu_checks.py --json "$out/checks.json" ;;
        parity)
            for dtype in fp32 bf16; do
                stage "parity_$dtype" "$PYTHON" tools/bench/train_step.py --flavor debug --layers 0 --dtype "$dtype" \
                    --seq-length 512 --samples-per-row 3 --image-side 8 --steps 2 --warmup 1 \
                    --json "$out/parity_$dtype.json"
            done
            ;;
        experts) stage experts "$PYTHON" tools/bench/experts.py --json "$out/experts.json" ;;
        step) stage step "$PYTHON" tools/bench/train_step.py --layers "${LAYERS:-4}" --json "$out/step.json" ;;
        trainer)
            common=(model.dtype=bf16 'data.kinds=[text,image]' data.num_workers=1 logging.progress_bar=false
                trainer.name=gpu_smoke optim.lr=1e-3 optim.warmup_steps=0)
            rm -rf "$out/trainer_straight" "$out/trainer_resumed"
            stage trainer_straight launch/local.sh --nproc 1 "${common[@]}" trainer.dir="$out/trainer_straight" \
                trainer.steps=6 checkpoint.every=3
            stage trainer_first3 launch/local.sh --nproc 1 "${common[@]}" trainer.dir="$out/trainer_resumed" \
                trainer.steps=3 checkpoint.every=3
            stage trainer_resume launch/local.sh --nproc 1 "${common[@]}" trainer.dir="$out/trainer_resumed" \
                trainer.steps=6 checkpoint.every=3
            stage trainer_compare "$PYTHON" - "$out/trainer_straight" "$out/trainer_resumed" <<'EOF'
import json, sys
def losses(d):
    rows = [json.loads(l) for l in open(f"{d}/logs/metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r.get("kind", "train") == "train" and "loss" in r}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
print("straight", [round(a[k], 6) for k in sorted(a)])
print("resumed ", [round(b[k], 6) for k in sorted(b)])
diff = max(abs(a[k] - b[k]) for k in a)
print(f"steps {sorted(a)}: max |loss difference| {diff:.3e} ({'bit-identical' if diff == 0 else 'differs'})")
sys.exit(0 if sorted(a) == sorted(b) == list(range(1, 7)) and diff < 1e-2 else 1)
EOF
            ;;
        *) echo "unknown stage $s (checks parity experts step trainer)" >&2; exit 2 ;;
    esac
done
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (logs in $out)"
    exit 1
fi
echo "all stages passed (logs in $out)"
