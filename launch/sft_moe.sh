#!/usr/bin/env bash
#SBATCH --job-name=qwenvl-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=runs/slurm/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
# Multi-node training under Slurm: one torchrun per node (8 ranks each), every argument after the script name
# passed to the trainer as a Hydra override, unchanged. Submit from the checkout's root:
#
#   mkdir -p runs/slurm     # once: Slurm does not create the directory of --output
#   sbatch --nodes 2 launch/sft_moe.sh experiment=sft_30b_a3b_2x8xh100 model.init_from=ckpt/qwen3vl-30b-mcore
#   sbatch --nodes 8 --time 48:00:00 launch/sft_moe.sh experiment=sft_235b_a22b_8x8xh100 data.train=sft.jsonl
#
# Pre-emption and the time limit: 300 s before the limit Slurm sends SIGUSR1 to this script only (B:). It is
# passed to srun as SIGUSR1 (srun turns a SIGTERM of its own into SIGKILL of every task), srun to each node's
# slurm/node.sh and torchrun, torchrun to the trainers: they finish the step, write a checkpoint and exit 143.
# A SIGTERM or SIGUSR1 sent to this script (`scancel --batch --signal=USR1 JOB`) does the same. When the nodes
# report 143 the script runs `scontrol requeue $SLURM_JOB_ID` and exits 0 (the attempt ended as planned; Slurm
# ends the job and queues it again); the requeued job runs this script with the same arguments and the trainer
# resumes from <trainer.dir>/checkpoints/latest by itself. Without a requeue (REQUEUE=0, or scontrol refused) it
# exits 143: submit the same command again to resume. A run that ends exits 0; any other status is the trainers'
# (3 bad steps, 2 bad input) or the launch's failure, and is not requeued.
# Not relied upon: Slurm's own SIGTERM to every process (grace-time pre-emption, the time limit itself). It can
# reach srun (which then kills the tasks); ask for PreemptParameters=send_user_signal, with which pre-emption sends
# the --signal above instead. (DataLoader workers ignore stop signals; the trainer shuts them down.)
# The lead time must cover a step plus a checkpoint: `sbatch --signal=B:USR1@600 ...` for slow file systems.
#
# Environment (export before sbatch; every default applies only when unset):
#   GPUS_PER_NODE      ranks per node (default: SLURM_GPUS_ON_NODE, else 8)
#   PYTHON             interpreter with this project installed (default: .venv/bin/python, else python3)
#   CONTAINER_IMAGE    run every node inside this image (pyxis/enroot); the checkout is mounted at its own path
#   CONTAINER_MOUNTS   more mounts, srun --container-mounts syntax (src:dst[,src:dst...])
#   MASTER_ADDR/PORT   rendezvous (default: first node of the job, port derived from the job id)
#   REQUEUE            0: do not requeue after a checkpointed stop (default 1)
#   NCCL_*, TORCH_NCCL_*, CUDA_DEVICE_MAX_CONNECTIONS, TORCH_ELASTIC_SHUTDOWN_TIMEOUT: see slurm/env.sh
set -euo pipefail

# Under sbatch this file runs from Slurm's spool directory: the checkout is then the submit directory.
for QW_CHECKOUT in "${QWENVL_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do
    [[ -f $QW_CHECKOUT/slurm/env.sh ]] && break
done
[[ -n $QW_CHECKOUT ]] || { echo "sft_moe.sh: no qwenvl-mcore checkout found: submit from its root or set QWENVL_ROOT" >&2; exit 2; }
# shellcheck source=slurm/env.sh
source "$QW_CHECKOUT/slurm/env.sh"
QW_LOG_NAME=sft_moe

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    qw_usage "${BASH_SOURCE[0]}"
    exit 0
fi
cd "$QW_ROOT"
qw_slurm_rendezvous
qw_torch_defaults
qw_srun_command

qw_log "job $SLURM_JOB_ID (start $((${SLURM_RESTART_COUNT:-0} + 1))): $QW_NNODES node(s) x $(qw_nproc_per_node) ranks," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT${CONTAINER_IMAGE:+, image $CONTAINER_IMAGE}"

srun_pid=
stop_asked=
# shellcheck disable=SC2329  # run by the traps below
stop_step() {
    stop_asked=$1
    qw_log "SIG$1: asking the trainers to checkpoint and stop (SIGUSR1 through srun)"
    [[ -z $srun_pid ]] || kill -s USR1 "$srun_pid" 2>/dev/null || true
}
trap 'stop_step USR1' USR1
trap 'stop_step TERM' TERM

# In the background, so that the traps run while the step goes on (bash runs them only between commands).
"${QW_SRUN[@]}" "$QW_ROOT/slurm/node.sh" "$@" &
srun_pid=$!
[[ -z $stop_asked ]] || kill -s USR1 "$srun_pid" 2>/dev/null || true
rc=0
qw_wait "$srun_pid" || rc=$?

case $rc in
    0)
        qw_log "training finished"
        ;;
    143)
        if [[ ${REQUEUE:-1} == 1 ]] && scontrol requeue "$SLURM_JOB_ID"; then
            qw_log "trainers checkpointed and stopped (143): job $SLURM_JOB_ID requeued; it resumes from the latest checkpoint"
            rc=0
        else
            qw_log "trainers checkpointed and stopped (143), job not requeued: submit the same command again to resume"
        fi
        ;;
    *)
        qw_log "step failed with status $rc${stop_asked:+ after SIG$stop_asked}; not requeued"
        ;;
esac
exit "$rc"
