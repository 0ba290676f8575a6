# shellcheck shell=bash
# The environment every launcher sources (launch/*.sh, slurm/*.sbatch, slurm/node.sh): the checkout, the python,
# NCCL/torch defaults, the rendezvous of a Slurm job, container flags, and waiting on a child through signals.
#
# Only what Slurm and torchrun need lives here: training settings belong to conf/ and reach the trainer as Hydra
# overrides, unchanged. Every default below applies only when the variable is unset, so exporting it first (or
# `sbatch --export=ALL,NAME=value`) wins. Functions are prefixed qw_; nothing here runs on its own but the defaults.

# The checkout this file belongs to (launchers cd here: conf/ and relative trainer.dir paths resolve from it).
QW_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export QW_ROOT

qw_log() {
    printf '[%s %s] %s\n' "${QW_LOG_NAME:-launch}" "$(date +%H:%M:%S)" "$*" >&2
}

qw_die() {
    qw_log "error: $*"
    exit 2
}

# Prints the comment block at the top of FILE (after the shebang and #SBATCH lines): the launcher's usage text.
qw_usage() {
    local line
    while IFS= read -r line; do
        case $line in
            '#!'* | '#SBATCH'*) continue ;;
            '#') echo ;;
            '# '*) echo "${line#'# '}" ;;
            *) break ;;
        esac
    done <"$1"
}

# The interpreter that runs the trainer: $PYTHON; else the checkout's .venv (not inside a container: a host venv
# points at the host's interpreter); else python3 from PATH (the image's, in a container).
qw_python() {
    if [[ -n ${PYTHON:-} ]]; then
        printf '%s\n' "$PYTHON"
    elif [[ -z ${CONTAINER_IMAGE:-} && -x $QW_ROOT/.venv/bin/python ]]; then
        printf '%s\n' "$QW_ROOT/.venv/bin/python"
    else
        printf '%s\n' python3
    fi
}

# Trainer processes per node: $GPUS_PER_NODE, else the GPUs Slurm gave this node, else 8 (one node of H100s).
qw_nproc_per_node() {
    printf '%s\n' "${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
}

# NCCL and torch settings for multi-node training; each can be overridden by exporting it first.
qw_torch_defaults() {
    # Abort the communicator and end the process on a NCCL error or timeout instead of hanging in a collective
    # (3 = abort without cleanup, which can itself hang); the old spelling, when exported, still decides.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-${NCCL_ASYNC_ERROR_HANDLING:-3}}
    # InfiniBand retry timeout 4.096 us x 2^22 (about 17 s; NCCL's 20 is about 4 s): rides out a congested or
    # flapping link on many nodes instead of failing the job.
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    # One hardware queue per GPU: megatron's tensor/sequence-parallel overlap relies on kernels running in the
    # order they are launched.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # NCCL buffers freed when the collective ends rather than through record_stream (less fragmentation).
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Ranks' lines reach the Slurm log as they are printed, interleaved in time order.
    export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
    # After an abort (SIGINT/SIGHUP) or a failed rank, how long torchrun lets the other trainers end before it kills
    # them (torch's default, 30 s, can cut a 30B/235B checkpoint write short). A stop does not go through torchrun
    # (slurm/node.sh); Slurm's time limit, after the --signal lead time, stays the hard bound.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
}

# The first host of a Slurm node list ("gpu[003-005,9],cpu1" -> gpu003): scontrol's answer when there is one,
# else qw_parse_first_host's.
qw_first_host() {
    local hosts
    if command -v scontrol >/dev/null 2>&1 && hosts=$(scontrol show hostnames "$1" 2>/dev/null) && [[ -n $hosts ]]; then
        printf '%s\n' "${hosts%%$'\n'*}"
    else
        qw_parse_first_host "$1"
    fi
}

# The first host of a node list without scontrol: the usual forms (host names with one bracket group of numbers
# and ranges, comma-separated), zero padding kept.
qw_parse_first_host() {
    local list=$1 head rest inside
    head=${list%%[\[,]*} # text before the first bracket or comma
    rest=${list:${#head}}
    if [[ $rest == '['* ]]; then
        inside=${rest#\[}
        inside=${inside%%]*}
        rest=${rest#*]}
        printf '%s%s%s\n' "$head" "${inside%%[,-]*}" "${rest%%,*}"
    else
        printf '%s\n' "$head"
    fi
}

# The rendezvous port of a job: derived from its id so that every node computes the same one and jobs sharing a
# node differ; 15000-29999 stays below Linux's ephemeral range (32768+), where outgoing connections take ports.
qw_master_port() {
    printf '%d\n' $((15000 + $1 % 15000))
}

# Exports QW_NNODES, MASTER_ADDR (first host of the allocation) and MASTER_PORT for a job's torchruns; an exported
# MASTER_ADDR/MASTER_PORT wins (e.g. the InfiniBand name of the first node).
qw_slurm_rendezvous() {
    [[ -n ${SLURM_JOB_ID:-} ]] ||
        qw_die "not inside a Slurm job: submit with sbatch (or run inside salloc); on one machine use launch/local.sh"
    export QW_NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    export MASTER_ADDR=${MASTER_ADDR:-$(qw_first_host "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:?}}")}
    export MASTER_PORT=${MASTER_PORT:-$(qw_master_port "$SLURM_JOB_ID")}
}

# Sets the array QW_SRUN: srun with one task per node on all QW_NNODES nodes, in the checkout, inside the container
# when CONTAINER_IMAGE is set (pyxis/enroot; the checkout is mounted at the same path, plus CONTAINER_MOUNTS).
# Options are written --name=value only (tests/launch's srun double relies on it).
qw_srun_command() {
    # shellcheck disable=SC2034  # used by the caller
    QW_SRUN=(srun --nodes="$QW_NNODES" --ntasks-per-node=1 --chdir="$QW_ROOT"
        # A node that stops first (e.g. after its part of the checkpoint) must not get the others killed.
        --kill-on-bad-exit=0)
    # Since Slurm 22.05 a step no longer inherits the job's CPUs per task: without this the node's torchrun, its
    # trainers and their data workers would share one core.
    if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
        QW_SRUN+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
    fi
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        QW_SRUN+=(--container-image="$CONTAINER_IMAGE"
            --container-mounts="$QW_ROOT:$QW_ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
            --container-workdir="$QW_ROOT")
    fi
}

# Seconds of a Slurm duration as squeue prints a time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); empty for
# UNLIMITED, NOT_SET, INVALID or anything else.
qw_duration_s() {
    local t=$1 days=0 h=0 m=0 sec=0
    [[ $t =~ ^[0-9]+(-[0-9]+)?(:[0-9]+){0,2}$ ]] || return 0
    if [[ $t == *-* ]]; then
        days=${t%%-*}
        t=${t#*-}
        IFS=: read -r h m sec <<<"$t"
    else
        case $(tr -dc : <<<"$t" | wc -c) in
            0) m=$t ;;
            1) IFS=: read -r m sec <<<"$t" ;;
            *) IFS=: read -r h m sec <<<"$t" ;;
        esac
    fi
    printf '%d\n' $(((10#$days * 24 + 10#${h:-0}) * 3600 + 10#${m:-0} * 60 + 10#${sec:-0}))
}
# The time limit of job ID in seconds (squeue), or nothing when unlimited or unknown (no squeue, no answer).
qw_job_time_limit_s() {
    local limit
    command -v squeue >/dev/null 2>&1 || return 0
    limit=$(squeue --noheader --jobs="$1" --format=%l 2>/dev/null) || return 0
    qw_duration_s "${limit//[[:space:]]/}"
}
# Waits for the child PID and returns its exit status, going on waiting when a trapped signal interrupts `wait`
# (bash then returns 128+signal while the child runs on).
qw_wait() {
    local pid=$1 rc again
    while :; do
        rc=0
        wait "$pid" || rc=$?
        if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        if ((rc > 128)); then
            # Interrupted just as the child ended: its own status is still to collect (127: rc already was it).
            again=0
            wait "$pid" 2>/dev/null || again=$?
            ((again == 127)) || rc=$again
        fi
        return "$rc"
    done
}
