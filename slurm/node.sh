#!/usr/bin/env bash
# One node of a training run: torchrun with this node's trainer ranks. srun starts it once per node
# (launch/sft_moe.sh); launch/local.sh runs it alone. Every argument is passed to the trainer unchanged.
#
#   slurm/node.sh [Hydra overrides...]
#
# Exits with the trainers' status, which torchrun alone does not report (it exits 1 whatever they returned):
# 0 done, 143 stopped by SIGTERM/SIGUSR1 after checkpointing (resumable), 3 bad steps, 2 bad input, 128+N a
# trainer killed by signal N; any other value is a trainer's or torchrun's own failure.
#
# Environment: QW_NNODES (default 1); QW_NODE_RANK (else SLURM_NODEID, SLURM_PROCID, 0); GPUS_PER_NODE (ranks per
# node, else SLURM_GPUS_ON_NODE, else 8); MASTER_ADDR and MASTER_PORT (unset: a single-node torchrun --standalone
# on a free port); PYTHON (see slurm/env.sh).
#
# Signals: SIGTERM and SIGUSR1 ask the trainers for a checkpoint and a clean stop (exit 143), SIGINT and SIGHUP
# abort. A stop reaches the trainers one way, whatever Slurm signals: this script creates $QW_STOP_FILE, which every
# trainer checks after each step. Slurm may signal only this task (proctrack/cgroup signals a step's tasks, not
# their children), its process group (pgid), or every process of the step (linuxproc), once or several times
# (srun forwarding, --signal, scancel, pre-emption): everything below this script tolerates that. torchrun
# ignores stop signals (slurm/torchrun.py), rank.py outlives its trainer, a trainer signalled directly only learns
# earlier what the file says, DataLoader workers ignore them, and megatron's checkpoint writer has no helper process
# to lose (qwenvl_mcore/checkpoint/write_results.py). The first SIGINT or SIGHUP is passed on to torchrun, which
# runs in a process group of its own, and stops the trainers without a checkpoint. Every process of the node dies
# with this script (PR_SET_PDEATHSIG down the chain torchrun -> rank.py -> trainer).
set -euo pipefail
# shellcheck source=slurm/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
QW_LOG_NAME=node
cd "$QW_ROOT"

node_rank=${QW_NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:-0}}}
nnodes=${QW_NNODES:-1}
nproc=$(qw_nproc_per_node)
python=$(qw_python)
qw_torch_defaults

if [[ -n ${MASTER_ADDR:-} ]]; then
    # Static rendezvous: node 0 hosts the store at MASTER_ADDR:MASTER_PORT, every node knows its rank up front.
    rendezvous=(--nnodes="$nnodes" --node-rank="$node_rank" --master-addr="$MASTER_ADDR"
        --master-port="${MASTER_PORT:?MASTER_ADDR is set but MASTER_PORT is not}")
else
    ((nnodes == 1)) || qw_die "QW_NNODES=$nnodes needs MASTER_ADDR and MASTER_PORT (launch/sft_moe.sh sets them)"
    rendezvous=(--standalone --nnodes=1)
fi

# Each rank leaves its exit status here (slurm/rank.py); node-local, removed on exit.
QW_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/qwenvl-node${node_rank}.XXXXXX")
export QW_STATUS_DIR
trap 'rm -rf "$QW_STATUS_DIR"' EXIT

export QW_STOP_FILE=$QW_STATUS_DIR/stop
torchrun_pid=
stop_asked=
abort_sent=
# shellcheck disable=SC2329  # run by the traps below
on_stop() {
    if [[ -n $stop_asked ]]; then
        qw_log "node $node_rank: SIG$1 again; the trainers are already checkpointing"
        return 0  # a bare return in a trap handler returns the interrupted command's status, and set -e exits
    fi
    stop_asked=$1
    : >"$QW_STOP_FILE"
    qw_log "node $node_rank: SIG$1: asking the trainers to checkpoint after this step and stop"
}
# shellcheck disable=SC2329
on_abort() {
    [[ -z $abort_sent && -n $torchrun_pid ]] || return 0
    abort_sent=$1
    qw_log "node $node_rank: SIG$1: stopping the trainers without a checkpoint"
    kill -s "$1" "$torchrun_pid" 2>/dev/null || true
}
trap 'on_stop TERM' TERM
trap 'on_stop USR1' USR1
trap 'on_abort INT' INT
trap 'on_abort HUP' HUP

qw_log "node $node_rank/$nnodes: $nproc ranks, rendezvous ${MASTER_ADDR:-standalone}${MASTER_PORT:+:$MASTER_PORT}, $python"
# rank.py records each trainer's status. slurm/torchrun.py is torchrun without its
# 50-line report of failed ranks: after a failure or a passed-on signal it ends with one line and status 1, and the
# trainers' statuses (and their error messages, printed once below) are what counts. OMP_NUM_THREADS=1 is what
# torchrun sets for several ranks anyway; set here, torchrun does not print its banner about it.
((nproc == 1)) || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set -m # torchrun in a process group of its own: a Ctrl-C reaches it once, through on_abort
"$python" "$QW_ROOT/slurm/torchrun.py" "${rendezvous[@]}" --nproc-per-node="$nproc" --max-restarts=0 \
    --signals-to-handle=SIGINT,SIGHUP,SIGQUIT \
    "$QW_ROOT/slurm/rank.py" -m qwenvl_mcore.train "$@" &
torchrun_pid=$!
set +m
torchrun_rc=0
qw_wait "$torchrun_pid" || torchrun_rc=$?

# The node's status, most telling first: a trainer's own failure (3, 2, 1...), a trainer killed by a signal
# (128+N), a rank that left no status (killed, or torchrun failed first: torchrun's status), 143 when the trainers
# stopped on a signal after checkpointing, 0 when all finished.
statuses=() failed='' killed='' missing='' stopped=''
for ((r = 0; r < nproc; r++)); do
    s=$(cat "$QW_STATUS_DIR/rank_$r" 2>/dev/null || echo none)
    statuses+=("$s")
    case $s in
        0) ;;
        143) stopped=143 ;;
        none) missing=$((torchrun_rc ? torchrun_rc : 1)) ;;
        signal*) killed=${killed:-$((128 + ${s#signal }))} ;;
        *) failed=${failed:-$s} ;;
    esac
done
rc=${failed:-${killed:-${missing:-${stopped:-0}}}}
# What stopped the trainers, each distinct message once (train.py leaves one per rank instead of printing it).
declare -A error_ranks=()
errors=()
for ((r = 0; r < nproc; r++)); do
    [[ -f $QW_STATUS_DIR/error_$r ]] || continue
    msg=$(<"$QW_STATUS_DIR/error_$r")
    [[ -n ${error_ranks[$msg]+set} ]] || errors+=("$msg")
    error_ranks[$msg]+="${error_ranks[$msg]:+,}$((node_rank * nproc + r))"
done
for msg in "${errors[@]}"; do
    if ((${#errors[@]} == 1)); then
        printf 'error: %s\n' "$msg" >&2
    else
        printf 'error (ranks %s): %s\n' "${error_ranks[$msg]}" "$msg" >&2
    fi
done
qw_log "node $node_rank: trainer exit statuses [$(IFS=,; echo "${statuses[*]}")], torchrun $torchrun_rc -> $rc"
exit "$rc"
