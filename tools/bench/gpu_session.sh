#!/usr/bin/env bash
# Every GPU measurement of issue 20 in one go, sized for about 8 minutes on one H200: ours against transformers in
# the same run at the benchmark's configuration and at 8,192-token rows, the parts with and without megatron DDP's
# gradient accumulation, the GPU-busy fraction, host syncs per step, and the GPU correctness checks. Prints the
# issue's goal table last (also DIR/summary.txt).
#
#   tools/bench/gpu_session.sh DIR                  on the GPU machine
#   tools/bench/gpu_session.sh DIR --cpu-smoke      the same stages, tiny, on the CPU (tests/tools/test_bench.py)
#   tools/bench/gpu_session.sh --fetch-wheels       here, with a network: the pinned megatron-core and transformers
#                                                   wheels (pyproject.toml) into .whl/ (git-ignored) for the GPU machine
#
# Through the device tool (its machine has torch but neither megatron-core nor this transformers, and no network):
#   1. here:  tools/bench/gpu_session.sh --fetch-wheels
#   2. run(command='tools/bench/gpu_session.sh "$OUT"', carry=[".whl"], timeout_s=600)
# The script installs the carried wheels into /tmp/qwenvl_site when the interpreter lacks those versions, and puts
# the checkout on PYTHONPATH. Only 8 files come back from $OUT, so DIR holds at most six: summary.txt, step.json,
# step8k.json, checks.json, env.txt and logs.tar.gz (every stage's full log and the profile op tables, refreshed
# after each stage, so a stage that times out leaves the others' results).
#
# Stages (each with its own timeout, seconds; environment variables override them):
#   step     (STEP_TIMEOUT 240)   train_step.py: 8 micro-batches x 4,096-token rows (4 samples, 1,024-patch images),
#                                  ours vs transformers; parts with/without DDP accumulation; host syncs; --profile
#                                  (kernel time, GPU busy)
#   step8k   (STEP8K_TIMEOUT 180) the same at 4 x 8,192-token rows with 2,116-patch images (46 x 46), no profile
#   checks   (CHECKS_TIMEOUT 60)  gpu_checks.py: varlen attention and grouped-GEMM experts against references (GPU only)
# PYTHON picks the interpreter (default: the checkout's .venv, else python3).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
root=$(pwd)
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
# name==version of the two packages the GPU machine lacks, as pyproject.toml pins them
pins=$(sed -n 's/^ *"\(megatron-core\|transformers\)==\([^"]*\)".*/\1==\2/p' pyproject.toml)

if [[ ${1:-} == --fetch-wheels ]]; then
    mkdir -p .whl
    rm -f .whl/megatron_core-*.whl .whl/transformers-*.whl
    # shellcheck disable=SC2086  # one argument per pin
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl $pins || exit 1
    ls -l .whl
    exit 0
fi

out=${1:?usage: tools/bench/gpu_session.sh DIR [--cpu-smoke] | --fetch-wheels}
smoke=0
case ${2:-} in
    "") ;;
    --cpu-smoke) smoke=1 ;;
    *) echo "unknown option ${2} (--cpu-smoke)" >&2; exit 2 ;;
esac
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/{summary.txt,env.txt,step.json,step8k.json,checks.json,logs.tar.gz}  # no stale results in the summary
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# The pinned megatron-core and transformers: from the interpreter, else from the carried wheels.
check_pins() {
    # shellcheck disable=SC2086
    "$PYTHON" - $pins <<'EOF'
import importlib.metadata as md, sys
bad = []
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = md.version(name).split("+")[0]
    except md.PackageNotFoundError:
        have = None
    if have != want:
        bad.append(f"{name} {have or 'absent'} (want {want})")
print("; ".join(bad))
sys.exit(1 if bad else 0)
EOF
}
if ! missing=$(check_pins); then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "== installing the carried wheels (.whl/) into /tmp/qwenvl_site: $missing"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/qwenvl_site .whl/*.whl || exit 2
        export PYTHONPATH="/tmp/qwenvl_site:$PYTHONPATH"
        missing=$(check_pins) || echo "warning: still $missing"
    else
        echo "warning: $missing; no wheels in .whl/ (run tools/bench/gpu_session.sh --fetch-wheels here and carry" \
            ".whl to the GPU machine)"
    fi
fi
if ! "$PYTHON" -c 'import torch, transformers, megatron.core, qwenvl_mcore.training.step' >"$out/env.txt" 2>&1; then
    tail -n 5 "$out/env.txt"
    echo "error: $PYTHON cannot import torch, transformers, megatron-core and this checkout (above); on the GPU" \
        "machine carry .whl (tools/bench/gpu_session.sh --fetch-wheels here)" | tee -a "$out/env.txt"
    exit 2
fi
{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available())'
    # shellcheck disable=SC2086
    "$PYTHON" -c 'import importlib.metadata as md, sys; print(*(f"{n} {md.version(n)}" for n in sys.argv[1:]))' \
        megatron-core transformers 2>&1
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

declare -A status
stage() { # name timeout command...: run with its log in $work, show its last lines, bundle the logs
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    grep -v -i -e warn -e '^\s*$' -e '^USDT' -e 'gpuGetDeviceCount' "$work/$name.log" | tail -n 14
    status[$name]="exit $rc after $((SECONDS - start)) s$( ((rc == 124)) && echo ' (timed out)')"
    echo "== $name: ${status[$name]}"
    tar -czf "$out/logs.tar.gz" -C "$work" .
}

bench=(tools/bench/train_step.py)
if ((smoke)); then
    tiny=(--flavor debug --layers 1 --samples-per-row 2 --steps 1 --warmup 1)
    stage step "${STEP_TIMEOUT:-120}" "$PYTHON" "${bench[@]}" "${tiny[@]}" --seq-length 256 --image-side 8 \
        --microbatches 2 --check-parts --profile "$work/profile_step" --json "$out/step.json"
    stage step8k "${STEP8K_TIMEOUT:-120}" "$PYTHON" "${bench[@]}" "${tiny[@]}" --seq-length 512 --image-side 12 \
        --microbatches 1 --json "$out/step8k.json"
    status[checks]="skipped (GPU only)"
else
    stage step "${STEP_TIMEOUT:-240}" "$PYTHON" "${bench[@]}" --layers 4 --seq-length 4096 --samples-per-row 4 \
        --image-side 32 --microbatches 8 --steps 3 --warmup 1 --profile "$work/profile_step" --json "$out/step.json"
    stage step8k "${STEP8K_TIMEOUT:-180}" "$PYTHON" "${bench[@]}" --layers 4 --seq-length 8192 --samples-per-row 4 \
        --image-side 46 --microbatches 4 --steps 3 --warmup 1 --json "$out/step8k.json"
    stage checks "${CHECKS_TIMEOUT:-60}" "$PYTHON" tools/bench/gpu_checks.py --json "$out/checks.json"
fi

"$PYTHON" - "$out" "step: ${status[step]}" "step8k: ${status[step8k]}" "checks: ${status[checks]}" <<'EOF' |
import json, os, sys

out, stages = sys.argv[1], sys.argv[2:]


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


step, big, checks = load("step.json"), load("step8k.json"), load("checks.json")


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def num(x, spec):
    return "-" if x is None else format(x, spec)


def met(x, target):
    return "-" if x is None else ("yes" if x >= target else "no")


def shape(r):
    c = get(r, "config")
    if not c:
        return "stage failed, no JSON"
    return (f"{c['microbatches']} x {c['seq_length']:,}-token rows, {c['image_side'] ** 2:,}-patch images, "
            f"{r['layers']} LLM layers")


rows = []


def ratio_row(r, label):
    o, t = get(r, "ours", "tokens_per_s"), get(r, "transformers", "tokens_per_s")
    err = get(r, "transformers", "error")
    x = get(r, "speedup")
    text = (f"{num(o, ',.0f')} / {num(t, ',.0f')} tokens/s = {num(x, '.2f')}x" if not err
            else f"{num(o, ',.0f')} tokens/s; transformers: {err}")
    rows.append((f"whole step, ours / transformers ({label})", ">= 2x", text, met(x, 2.0)))


ratio_row(step, "benchmark: " + shape(step))
ratio_row(big, shape(big))
def tokens(r):
    n = get(r, "config", "seq_length")
    return "?" if n is None else f"{n:,}-token rows"


def patches(r):
    n = get(r, "config", "image_side")
    return "?" if n is None else f"{n * n:,}-patch images"


for r in (big, step):
    for key, how in (("parts_tflops", "with DDP accumulation"), ("parts_no_ddp_tflops", "without")):
        x = get(r, "ours", key, "decoder")
        rows.append((f"decoder layers, {tokens(r)}, {how}", ">= 300 TFLOP/s", num(x, ".1f"), met(x, 300)))
for r in (step, big):
    a, b = get(r, "ours", "parts_tflops", "vision"), get(r, "ours", "parts_no_ddp_tflops", "vision")
    rows.append((f"ViT, {patches(r)}, with / without DDP accumulation", ">= 300 TFLOP/s",
                 f"{num(a, '.1f')} / {num(b, '.1f')}", met(a, 300)))
a, b = get(step, "ours", "parts_tflops", "lm_head"), get(step, "ours", "parts_no_ddp_tflops", "lm_head")
rows.append((f"LM head + loss, {tokens(step)}, with / without DDP accumulation", "-",
             f"{num(a, '.1f')} / {num(b, '.1f')} TFLOP/s", "-"))
o, t = get(step, "ours", "gpu_busy"), get(step, "transformers", "gpu_busy")
rows.append(("GPU busy (union of kernel intervals / wall of one profiled step), ours / transformers", ">= 90%",
             f"{num(o, '.1%')} / {num(t, '.1%')}", met(o, 0.9)))
ko, kt = get(step, "ours", "profiled", "kernel_ms"), get(step, "transformers", "profiled", "kernel_ms")
wo, wt = get(step, "ours", "profiled", "wall_ms"), get(step, "transformers", "profiled", "wall_ms")
rows.append(("kernel time / profiled step wall, ms, ours; transformers", "-",
             f"{num(ko, '.1f')} / {num(wo, '.1f')}; {num(kt, '.1f')} / {num(wt, '.1f')}", "-"))
for r in (step, big):
    label = tokens(r)
    so, st = get(r, "ours", "counts", "host_syncs"), get(r, "transformers", "counts", "host_syncs")
    co, ct = get(r, "ours", "counts", "cuda_sync_warnings"), get(r, "transformers", "counts", "cuda_sync_warnings")
    ao, at = get(r, "ours", "counts", "aten_calls"), get(r, "transformers", "counts", "aten_calls")
    rows.append((f"host syncs per step ({label}), ours / transformers: SyncCounter; CUDA sync-debug "
                 f"warnings; aten calls", "-",
                 f"{num(so, 'd')} / {num(st, 'd')}; {num(co, 'd')} / {num(ct, 'd')}; {num(ao, ',d')} / "
                 f"{num(at, ',d')}", "-"))
for r in (step, big):
    label = tokens(r)
    x = get(r, "first_loss_rel_diff")
    limit = get(r, "first_loss_limit")
    rows.append((f"first-step loss, ours against transformers ({label}), relative difference",
                 f"<= {num(limit, 'g')}", num(x, ".1e"), "-" if x is None else ("yes" if x <= limit else "no")))
failed = [r.get("check") for r in checks or [] if not r.get("ok")]
env = get(step, "environment") or get(big, "environment") or {}
print(f"# issue 20 goal table: {env.get('device', '?')}, torch {env.get('torch', '?')}, transformers "
      f"{env.get('transformers', '?')}, megatron-core {env.get('megatron_core', '?')}; parts are forward + backward "
      f"of one micro-batch")
print("# stages: " + "; ".join(stages) + ("" if checks is None else f"; GPU checks failed: {failed or 'none'}"))
print("| goal | target | measured | met |")
print("|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
EOF
    tee "$out/summary.txt"
rm -rf "$work"
[[ ${status[step]} == "exit 0"* && ${status[step8k]} == "exit 0"* && ${status[checks]} != "exit "[1-9]* ]]
