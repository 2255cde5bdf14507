#!/usr/bin/env bash
# A single-node Slurm cluster on localhost for the Slurm tests (Debian's slurm-wlm + munge).
#
#   bash tests/slurm/cluster.sh install   # apt-get slurm-wlm munge if missing (idempotent, root)
#   bash tests/slurm/cluster.sh start     # install if missing, write slurm.conf, start munged,
#                                         # slurmctld, slurmd; wait until the node is idle
#   bash tests/slurm/cluster.sh stop      # stop the daemons this script started
#   bash tests/slurm/cluster.sh status    # sinfo/squeue, or why the cluster is not up
#   eval "$(bash tests/slurm/cluster.sh env)"   # SLURM_CONF for sbatch/squeue/scontrol in a shell
#
# Built for containers and CI (root, no systemd, no cgroups, no stdin): daemons run in the
# background as root, processes are tracked through /proc (proctrack/linuxproc), and nothing is
# written outside $MEGAMOD_SLURM_DIR except munge's key/socket (munge's own fixed paths).
# Our slurm.conf is never installed as /etc/slurm/slurm.conf: clients find it through SLURM_CONF,
# so a real Slurm installation on the same machine is left alone (ports are non-default too).
set -euo pipefail

SLURM_DIR=${MEGAMOD_SLURM_DIR:-/tmp/megamod-slurm}
CONF=$SLURM_DIR/slurm.conf
CTLD_PORT=${MEGAMOD_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${MEGAMOD_SLURMD_PORT:-16818}
START_TIMEOUT_S=${MEGAMOD_SLURM_START_TIMEOUT_S:-60}

log() { echo "[cluster.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

have_binaries() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null && command -v munge >/dev/null
}

cmd_install() {
    if have_binaries; then
        log "slurm-wlm and munge already installed ($(slurmctld -V))"
    else
        [[ $(id -u) == 0 ]] || die "slurm-wlm/munge are missing; installing them needs root:" \
            "apt-get install -y slurm-wlm munge"
        log "installing slurm-wlm and munge with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null </dev/null
        have_binaries || die "apt-get finished but slurmctld/slurmd/sbatch/munged are still not on PATH"
        log "installed $(slurmctld -V)"
    fi
    # Debian's munge postinst creates the key; a pre-seeded image may lack it.
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey --create --force; else create-munge-key -f; fi
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 600 /etc/munge/munge.key
    fi
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then log "munged already running"; return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    # munged refuses to run as root when the key belongs to the munge user: start it as munge.
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged --force
    else
        munged --force
    fi
    touch "$SLURM_DIR/run/munged.ours"
    for _ in $(seq 50); do munge_works && return; sleep 0.1; done
    die "munged did not start; see /var/log/munge/munged.log"
}

write_conf() {
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    # Two tasks per test job need two CPUs; on a one-CPU runner declare two anyway
    # (config_overrides below stops slurmd from draining the node for the mismatch).
    ((cpus >= 2)) || cpus=2
    mkdir -p "$SLURM_DIR"/{state/ctld,state/d,log,run}
    cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster on $host; do not edit.
ClusterName=megamod-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$SLURM_DIR/state/ctld
SlurmdSpoolDir=$SLURM_DIR/state/d
SlurmctldPidFile=$SLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/run/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Containers have no usable cgroup hierarchy: track job processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Look at pending (e.g. requeued) jobs every 2 s instead of every 60 s.
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
# Batch jobs may be requeued (scontrol requeue from inside the job on preemption).
JobRequeue=1
KillWait=10
MinJobAge=600
ReturnToService=2
InactiveLimit=0
SlurmdTimeout=120
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    log "wrote $CONF ($host, $cpus CPUs)"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null | head -1; }

cmd_start() {
    cmd_install
    mkdir -p "$SLURM_DIR/run"
    if pid_alive "$SLURM_DIR/run/slurmctld.pid" && pid_alive "$SLURM_DIR/run/slurmd.pid" &&
        [[ $(node_state) == idle* || $(node_state) == mixed* || $(node_state) == alloc* ]]; then
        log "cluster already up: node $(node_state)"
        return
    fi
    cmd_stop quiet
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    # -c: start clean (no jobs/state from an earlier run); -i: ignore stale slurmd state.
    slurmctld -c -f "$CONF" </dev/null
    slurmd -c -f "$CONF" </dev/null
    local state="" deadline=$((SECONDS + START_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        state=$(node_state)
        if [[ $state == idle* ]]; then
            log "cluster up: node $(hostname -s) idle, SLURM_CONF=$CONF"
            return
        fi
        if [[ $state == drain* || $state == down* ]]; then
            # A node drained for a stale reason (e.g. an earlier unclean stop) can be resumed.
            scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
        fi
        sleep 0.5
    done
    log "node state: '${state:-<no answer from slurmctld>}' after ${START_TIMEOUT_S}s"
    log "--- slurmctld.log (tail) ---"; tail -n 30 "$SLURM_DIR/log/slurmctld.log" >&2 || true
    log "--- slurmd.log (tail) ---"; tail -n 30 "$SLURM_DIR/log/slurmd.log" >&2 || true
    die "the test cluster did not come up"
}

stop_daemon() {
    local name=$1 pidfile=$SLURM_DIR/run/$1.pid pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }; sleep 0.1; done
    log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

cmd_stop() {
    [[ -d $SLURM_DIR/run ]] || return 0
    # Cancel what is left so slurmd does not leave job processes behind.
    if pid_alive "$SLURM_DIR/run/slurmctld.pid"; then
        SLURM_CONF=$CONF scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    if [[ -e $SLURM_DIR/run/munged.ours ]]; then
        local pid
        pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
        if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi
        rm -f "$SLURM_DIR/run/munged.ours"
    fi
    [[ ${1:-} == quiet ]] || log "cluster stopped"
}

cmd_status() {
    pid_alive "$SLURM_DIR/run/slurmctld.pid" || die "slurmctld is not running (bash $0 start)"
    pid_alive "$SLURM_DIR/run/slurmd.pid" || die "slurmd is not running (bash $0 start)"
    SLURM_CONF=$CONF sinfo -N -l
    SLURM_CONF=$CONF squeue
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
