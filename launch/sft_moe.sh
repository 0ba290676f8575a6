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
# Pre-emption and the time limit: SIGNAL_LEAD seconds (300) before the limit Slurm sends SIGUSR1 to this script
# only (B:). It is passed to srun as SIGUSR1 (srun turns a SIGTERM of its own into SIGKILL of every task), srun to
# each node's slurm/node.sh, which asks its trainers to stop: they finish the step, write a checkpoint and exit 143.
# A SIGTERM or SIGUSR1 sent to this script (`scancel --batch --signal=USR1 JOB`) does the same, and so does a
# SIGTERM or SIGUSR1 that reaches node.sh directly, however often and whichever processes Slurm signals (any
# ProctrackType: linuxproc, pgid, cgroup). When the nodes report 143 the script runs `scontrol requeue
# $SLURM_JOB_ID` and exits 0 (the attempt ended as planned; Slurm ends the job and queues it again); the requeued
# job runs this script with the same arguments and the trainer resumes from <trainer.dir>/checkpoints/latest by
# itself (Slurm itself then logs "*** JOB N ... CANCELLED AT ... DUE TO JOB REQUEUE ***": that is the requeue, not a
# failure). Without a requeue (REQUEUE=0, or scontrol refused) it exits 143: submit the same command again to resume.
# A run that ends exits 0; any other status is the trainers' (3 bad steps, 2 bad input) or the launch's failure,
# and is not requeued. `scancel JOB` (no signal) cancels: Slurm sends SIGTERM and, KillWait later, SIGKILL. Under
# proctrack/cgroup the trainers checkpoint if that time allows; under linuxproc/pgid srun gets the SIGTERM too and
# kills its tasks at once (srun's own rule). Either way nothing half-written is ever named by `latest`; to stop
# with a checkpoint use `scancel --batch --signal=USR1 JOB`.
# The lead must cover a step plus a checkpoint: `sbatch --signal=B:USR1@600 ...` for slow file systems, and then
# export SIGNAL_LEAD=600 too (Slurm does not tell a job its --signal). A job whose --time is not longer than the
# lead is refused at its start (it would get the signal at once and requeue itself forever, a step at a time).
#
# Pre-emption by a higher-priority partition sends the same SIGUSR1 when slurm.conf asks for it, with the
# pre-empted job requeued (JobRequeue=1 or this script's --requeue) and given a GraceTime that covers a step plus
# a checkpoint:
#   Slurm 23.02 and later:  PreemptMode=REQUEUE  PreemptParameters=send_user_signal
#   Slurm 22.05 and older:  PreemptMode=REQUEUE  SlurmctldParameters=preempt_send_user_signal
#                           (PreemptParameters does not exist there: slurmctld refuses to start)
# Without it Slurm sends SIGTERM to the job's processes at pre-emption, which takes the same path (node.sh gets it
# under every ProctrackType) but only the GraceTime is left for the checkpoint.
#
# CPU-only nodes (no GPUs, e.g. trying it out with experiment=debug_cpu_tp2_ep2): override the GPU request, which a
# node without GPUs refuses ("Invalid generic resource (gres) specification"), and say how many ranks to start:
#   GPUS_PER_NODE=4 sbatch --gpus-per-node=0 launch/sft_moe.sh experiment=debug_cpu_tp2_ep2
#
# Environment (export before sbatch; every default applies only when unset):
#   GPUS_PER_NODE      ranks per node (default: SLURM_GPUS_ON_NODE, else 8)
#   PYTHON             interpreter with this project installed (default: .venv/bin/python, else python3)
#   CONTAINER_IMAGE    run every node inside this image (pyxis/enroot); the checkout is mounted at its own path
#   CONTAINER_MOUNTS   more mounts, srun --container-mounts syntax (src:dst[,src:dst...])
#   MASTER_ADDR/PORT   rendezvous (default: first node of the job, port derived from the job id)
#   REQUEUE            0: do not requeue after a checkpointed stop (default 1)
#   SIGNAL_LEAD        seconds of the --signal lead above (default 300), to refuse a --time that is not longer
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

# A time limit that leaves no time before the stop signal: refuse, rather than checkpoint a step and requeue forever.
lead=${SIGNAL_LEAD:-300}
[[ $lead =~ ^[0-9]+$ ]] || qw_die "SIGNAL_LEAD=$lead: give the --signal lead in seconds (e.g. 300)"
limit=$(qw_job_time_limit_s "$SLURM_JOB_ID")
if [[ -n $limit ]] && ((limit <= lead)); then
    qw_die "job $SLURM_JOB_ID has --time of ${limit}s, not longer than the ${lead}s lead of its stop signal" \
        "(--signal=B:USR1@$lead): it would checkpoint at once and requeue forever. Submit with a longer --time," \
        "or a shorter lead: sbatch --signal=B:USR1@N with SIGNAL_LEAD=N exported"
fi

srun_pid=
stop_asked=
# shellcheck disable=SC2329  # run by the traps below
stop_step() {
    if [[ -n $stop_asked ]]; then
        qw_log "SIG$1 again: the trainers are already checkpointing"
        return 0  # a bare return in a trap handler returns the interrupted command's status, and set -e exits
    fi
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
# The step is over: a signal from now on (`scontrol requeue` below makes Slurm signal this script and its children,
# `date` in qw_log included) has nothing left to stop.
trap '' USR1 TERM

case $rc in
    0)
        qw_log "training finished"
        ;;
    143)
        if [[ ${REQUEUE:-1} == 1 ]]; then
            qw_log "trainers checkpointed and stopped (143): requeueing job $SLURM_JOB_ID; it resumes from the" \
                "latest checkpoint"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            qw_log "scontrol requeue refused: submit the same command again to resume"
        else
            qw_log "trainers checkpointed and stopped (143), job not requeued (REQUEUE=$REQUEUE): submit the same" \
                "command again to resume"
        fi
        ;;
    *)
        qw_log "step failed with status $rc${stop_asked:+ after SIG$stop_asked}; not requeued"
        ;;
esac
exit "$rc"
