#!/usr/bin/env bash
#SBATCH --job-name=qwenvl-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=runs/slurm/%x-%j.out
#SBATCH --open-mode=append
# Checkpoint conversion as a Slurm job (one node, CPU only: the converters stream tensors, no GPU needed):
# tools/convert/hf2mcore.py or mcore2hf.py with every following argument passed unchanged. Submit from the
# checkout's root; without Slurm (no SLURM_JOB_ID) the tool runs here directly.
#
#   mkdir -p runs/slurm     # once: Slurm does not create the directory of --output
#   sbatch launch/convert.sh hf2mcore --hf /models/Qwen3-VL-30B-A3B-Instruct --out ckpt/qwen3vl-30b-mcore --procs 16
#   sbatch launch/convert.sh mcore2hf --mcore runs/sft_30b_a3b_2x8xh100 --out export/qwen3vl-30b-sft --procs 16
#   launch/convert.sh hf2mcore --help
#
# A conversion is not resumed: outputs appear only when complete, so a cancelled job is simply submitted again.
# PYTHON, CONTAINER_IMAGE and CONTAINER_MOUNTS as for launch/sft_moe.sh (slurm/env.sh).
set -euo pipefail

# Under sbatch this file runs from Slurm's spool directory: the checkout is then the submit directory.
for QW_CHECKOUT in "${QWENVL_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do
    [[ -f $QW_CHECKOUT/slurm/env.sh ]] && break
done
[[ -n $QW_CHECKOUT ]] || { echo "convert.sh: no qwenvl-mcore checkout found: submit from its root or set QWENVL_ROOT" >&2; exit 2; }
# shellcheck source=slurm/env.sh
source "$QW_CHECKOUT/slurm/env.sh"
QW_LOG_NAME=convert

tool=${1:-}
case $tool in
    hf2mcore | mcore2hf) shift ;;
    -h | --help)
        qw_usage "${BASH_SOURCE[0]}"
        exit 0
        ;;
    '')
        qw_usage "${BASH_SOURCE[0]}" >&2
        exit 2
        ;;
    *) qw_die "first argument: hf2mcore or mcore2hf, not '$tool' (launch/convert.sh --help)" ;;
esac
cd "$QW_ROOT"

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    exec "$(qw_python)" "tools/convert/$tool.py" "$@"
fi
export QW_NNODES=1
qw_srun_command
qw_log "job $SLURM_JOB_ID: $tool $*"
# The python is chosen on the node (inside the container when there is one), hence bash -c; the arguments travel
# as positional parameters, untouched.
# shellcheck disable=SC2016  # expanded by that bash on the node, not here
exec "${QW_SRUN[@]}" bash -c 'source slurm/env.sh && exec "$(qw_python)" "tools/convert/$0.py" "$@"' "$tool" "$@"
