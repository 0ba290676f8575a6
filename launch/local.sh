#!/usr/bin/env bash
# Training on one machine without Slurm: torchrun --standalone with one rank per GPU (or --nproc N), every other
# argument passed to the trainer as a Hydra override, unchanged.
#
#   launch/local.sh --nproc 4 experiment=debug_cpu_tp2_ep2        # the tiny model, 4 CPU processes (gloo)
#   launch/local.sh experiment=sft_30b_a3b_1x8xh100 model.init_from=ckpt/qwen3vl-30b-mcore
#
# Ranks: --nproc N, else GPUS_PER_NODE, else the GPUs nvidia-smi lists. Exit status: the trainers' (0 done,
# 143 stopped by a signal after checkpointing, 3 bad steps, 2 bad input; see slurm/node.sh). `kill -TERM PID` or
# `kill -USR1 PID` (PID of this script) checkpoints and stops; the same command again resumes. Ctrl-C aborts.
# PYTHON, NCCL_* and the other settings of slurm/env.sh apply.
set -euo pipefail
# shellcheck source=slurm/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../slurm/env.sh"
QW_LOG_NAME=local

nproc=${GPUS_PER_NODE:-}
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help)
            qw_usage "${BASH_SOURCE[0]}"
            exit 0
            ;;
        --nproc) nproc=${2:?--nproc needs a number}; shift 2 ;;
        --nproc=*) nproc=${1#--nproc=}; shift ;;
        *) break ;; # the first override: everything from here on is the trainer's
    esac
done
if [[ -z $nproc ]] && command -v nvidia-smi >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || qw_die "how many ranks? no GPU found: pass --nproc N (e.g. --nproc 4 experiment=debug_cpu_tp2_ep2)"

# One node, no MASTER_ADDR: node.sh runs torchrun --standalone (a free port of this machine).
unset MASTER_ADDR MASTER_PORT
export QW_NNODES=1 QW_NODE_RANK=0 GPUS_PER_NODE=$nproc
exec "$QW_ROOT/slurm/node.sh" "$@"
