# Shared helpers for slurm/*.sbatch; sourced by them, not run.
#
# A job script sets its defaults and calls `megamod_run DEFAULT_CONFIG "$@"`, which
#   - takes the config and overrides from the command line, else the environment:
#       sbatch slurm/pretrain_1b.sbatch [--config FILE] [--train.run_dir DIR] [--section.field VALUE ...]
#       MEGAMOD_CONFIG=FILE MEGAMOD_RUN_DIR=DIR MEGAMOD_OVERRIDES="--train.steps 100" sbatch ...
#     (environment overrides come first, so the command line wins where a flag appears twice);
#   - writes everything under the run directory: {run_dir}/logs/{job id}.out (all ranks, lines
#     prefixed by rank; a requeued job appends to its log), {run_dir}/tensorboard/ and
#     {run_dir}/checkpoints/ (the trainer's);
#   - prints how to watch the run;
#   - starts one task per GPU with srun running the trainer directly, sets the NCCL/CUDA knobs
#     below, and forwards SIGUSR1/SIGTERM that reach the batch shell to srun (and so to every
#     rank), so that the trainer checkpoints, requeues the job and exits; the requeued job resumes
#     from the newest complete checkpoint in the same run directory.
#
# Other environment knobs: MEGAMOD_TRAIN_CMD (default "python -m megamod.train"; e.g. a profiler
# wrapper or a test stand-in), MEGAMOD_ROOT (the repository; found from the job's script path),
# MEGAMOD_MAX_RESTARTS (requeues after a rank fails, default 2; see megamod_requeue_on_failure).

megamod_log() {
    local line
    line="[$(date '+%F %T')] [megamod-slurm] $*"
    echo "$line"
    [[ -n ${MEGAMOD_LOG:-} ]] && echo "$line" >>"$MEGAMOD_LOG"
    return 0
}

megamod_die() {
    megamod_log "ERROR: $*"
    exit 2
}

# Split "$@" into MEGAMOD_CONFIG, MEGAMOD_RUN_DIR and the remaining MEGAMOD_ARGS (an array).
megamod_parse_args() {
    local default_config=$1 default_run_dir=$2
    shift 2
    local -a env_overrides=()
    # Word-split on purpose: MEGAMOD_OVERRIDES is "--a.b 1 --c.d x" (no quoting inside).
    # shellcheck disable=SC2206
    [[ -n ${MEGAMOD_OVERRIDES:-} ]] && env_overrides=(${MEGAMOD_OVERRIDES})
    set -- "${env_overrides[@]}" "$@"
    MEGAMOD_CONFIG=${MEGAMOD_CONFIG:-$default_config}
    MEGAMOD_RUN_DIR=${MEGAMOD_RUN_DIR:-$default_run_dir}
    MEGAMOD_ARGS=()
    while (($#)); do
        case $1 in
            --config | --train.run_dir) [[ $# -ge 2 ]] || megamod_die "$1 needs a value" ;;&
            --config) MEGAMOD_CONFIG=$2; shift 2 ;;
            --config=*) MEGAMOD_CONFIG=${1#*=}; shift ;;
            --train.run_dir) MEGAMOD_RUN_DIR=$2; shift 2 ;;
            --train.run_dir=*) MEGAMOD_RUN_DIR=${1#*=}; shift ;;
            *) MEGAMOD_ARGS+=("$1"); shift ;;
        esac
    done
    [[ -f $MEGAMOD_CONFIG ]] || megamod_die "config $MEGAMOD_CONFIG not found (relative paths are from $PWD)"
    mkdir -p "$MEGAMOD_RUN_DIR/logs"
    MEGAMOD_RUN_DIR=$(cd "$MEGAMOD_RUN_DIR" && pwd)
}

megamod_setup_env() {
    # The trainer is imported from the checkout the job was submitted from, installed or not.
    export PYTHONPATH=$MEGAMOD_ROOT${PYTHONPATH:+:$PYTHONPATH}
    # Log lines reach the log file as they happen, not when a 8 KiB buffer fills (or never, when
    # the job is killed); a rank that dies of SIGSEGV/SIGABRT prints its Python stack.
    export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
    # One thread per CPU Slurm gave the task: otherwise every rank starts one per core of the
    # node and 8 ranks oversubscribe it 8 times over.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # Megatron-style TP/SP overlap needs one hardware work queue per GPU: kernels then start in
    # the order they were issued, so a communication kernel issued before a GEMM gets its SMs
    # first and runs alongside it instead of queueing behind it.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # A rank whose collective fails or times out (a peer died, a link dropped) aborts the NCCL
    # communicator and exits, so srun --kill-on-bad-exit ends the job at once instead of every
    # rank hanging in the collective until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Buffers of async collectives are freed when wait() returns instead of through the caching
    # allocator's cross-stream bookkeeping, which holds them longer: lower peak memory when
    # communication overlaps compute.
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    # WARN keeps logs readable; NCCL_DEBUG=INFO prints the rings/trees and transports NCCL chose,
    # the first thing to look at when a job is slow or hangs at start.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # InfiniBand retry timeout 4.096 us * 2^22 (~17 s) rather than 2^18 (~1 s): large jobs ride
    # out a switch hiccup instead of failing the collective.
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    # Site-specific, left to the cluster's own docs: the NICs NCCL may use, e.g.
    #   export NCCL_SOCKET_IFNAME=ib0   NCCL_IB_HCA=mlx5
}

megamod_print_watch() {
    megamod_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) attempt $((${SLURM_RESTART_COUNT:-0} + 1))" \
        "on ${SLURM_JOB_NUM_NODES:-?} node(s), ${SLURM_NTASKS:-?} task(s): ${SLURM_JOB_NODELIST:-?}"
    megamod_log "config $MEGAMOD_CONFIG, overrides: ${MEGAMOD_ARGS[*]:-(none)}"
    megamod_log "run dir      $MEGAMOD_RUN_DIR"
    megamod_log "log          tail -f $MEGAMOD_LOG"
    megamod_log "tensorboard  tensorboard --logdir $MEGAMOD_RUN_DIR/tensorboard --port 6006"
    megamod_log "             (elsewhere: ssh -L 6006:localhost:6006 $(hostname -s), open http://localhost:6006)"
    megamod_log "checkpoints  $MEGAMOD_RUN_DIR/checkpoints (a requeued or resubmitted job resumes from the newest)"
}

# srun in the background, so the batch shell can pass on a signal that reaches only it
# (`scancel --signal=USR1 --batch`, `#SBATCH --signal=B:USR1@600`, a SIGTERM before a kill) to
# srun, which forwards it to every rank. A trap with a handler, never `trap '' SIG`: an ignored
# signal stays ignored in srun and the ranks, which would then never hear of it.
megamod_srun() {
    local -a srun_args=(
        --kill-on-bad-exit=1          # one rank dies -> end the step rather than hang the others
        --label                       # prefix each output line with the rank
        --output="$MEGAMOD_LOG" --open-mode=append
    )
    # Slurm 22.05 stopped passing sbatch's --cpus-per-task on to srun (23.11 passes it again).
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # One task per GPU with every GPU of the node visible to every task (no --gpus-per-task):
    # the trainer picks cuda:{local_rank}, and NCCL's peer-to-peer paths need the other GPUs seen.
    megamod_log "srun ${srun_args[*]} $*"
    echo "===== job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) $(date '+%F %T') =====" \
        >>"$MEGAMOD_LOG"
    srun "${srun_args[@]}" "$@" &
    local pid=$! rc
    # shellcheck disable=SC2064  # $pid is meant to expand now
    trap "megamod_log 'batch shell got SIGUSR1: forwarding to srun'; kill -USR1 $pid 2>/dev/null" USR1
    # shellcheck disable=SC2064
    trap "MEGAMOD_GOT_TERM=1; megamod_log 'batch shell got SIGTERM: forwarding to srun'; kill -TERM $pid 2>/dev/null" TERM
    # `wait` returns early whenever a trapped signal arrives: wait until srun is really gone.
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
    wait "$pid" && rc=0 || rc=$?
    trap - USR1 TERM
    return "$rc"
}

# megamod_run DEFAULT_CONFIG DEFAULT_RUN_DIR "$@": the whole job.
megamod_run() {
    [[ -n ${SLURM_JOB_ID:-} ]] || megamod_die "run this with sbatch (SLURM_JOB_ID is not set)"
    cd "$MEGAMOD_ROOT" || megamod_die "cannot cd to MEGAMOD_ROOT=$MEGAMOD_ROOT"
    megamod_parse_args "$@"
    MEGAMOD_LOG=$MEGAMOD_RUN_DIR/logs/$SLURM_JOB_ID.out
    megamod_setup_env
    megamod_print_watch
    local -a train_cmd
    # shellcheck disable=SC2206
    train_cmd=(${MEGAMOD_TRAIN_CMD:-python -m megamod.train})
    local rc=0
    megamod_srun "${train_cmd[@]}" --config "$MEGAMOD_CONFIG" --train.run_dir "$MEGAMOD_RUN_DIR" \
        "${MEGAMOD_ARGS[@]}" || rc=$?
    megamod_log "srun exited with $rc; logs in $MEGAMOD_LOG"
    megamod_requeue_on_failure "$rc"
    return "$rc"
}

# A rank that died or hung ends the step (srun --kill-on-bad-exit; its peers exit 3 naming it):
# requeue the job, at most MEGAMOD_MAX_RESTARTS times (default 2, torchrun's --max-restarts), and
# the requeued job resumes from the newest complete checkpoint. Not after the exits a restart
# would only repeat: 2 bad input, 4 too many skipped steps, 5 a checkpoint that could not be saved
# (megamod/train/cli.py lists them).
megamod_requeue_on_failure() {
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0} max=${MEGAMOD_MAX_RESTARTS:-2}
    case $rc in 0 | 2 | 4 | 5) return 0 ;; esac
    # SIGTERM reached this shell: Slurm is ending the job (scancel, the time limit) or requeueing
    # it already (rank 0's `scontrol requeue` after SIGUSR1).
    [[ -n ${MEGAMOD_GOT_TERM:-} ]] && return 0
    if ((restarts >= max)); then
        megamod_log "not requeueing after exit $rc: restarted $restarts time(s) already (MEGAMOD_MAX_RESTARTS=$max)"
        return 0
    fi
    megamod_log "a rank failed (srun exit $rc): requeueing, restart $((restarts + 1)) of $max;" \
        "the job resumes from the newest complete checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || megamod_log "scontrol requeue failed: resubmit the job to resume"
}
