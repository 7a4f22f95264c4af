#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying launch/slurm/jaxeff.sbatch and for the tests.
#
#   launch/slurm/local-cluster.sh start     # munged + slurmctld + slurmd; returns once the node is idle
#   source "${JAXEFF_SLURM_DIR:-/tmp/jaxeff-slurm}/env.sh"   # or: export SLURM_CONF=... as printed
#   sbatch launch/slurm/jaxeff.sbatch configs/debug.yaml runs/slurm-debug
#   launch/slurm/local-cluster.sh status
#   launch/slurm/local-cluster.sh stop      # stops the daemons it started (by the pids in its own pid files)
#
# Needs root and the Debian packages slurm-wlm and munge (it does not install them). Everything it
# writes -- config, munge key and socket, state, spool, logs, pid files, env.sh -- lives in one folder,
# ${JAXEFF_SLURM_DIR:-/tmp/jaxeff-slurm}; the system's /etc/slurm and /etc/munge are not used.
# The node is "localhost" with ${JAXEFF_SLURM_CPUS:-8} CPUs (more than the machine may have, so
# that several tasks fit on a small machine), one partition "local". start and stop are idempotent.
# Ports: ${JAXEFF_SLURM_PORT:-6817} (slurmctld) and that + 1 (slurmd).
set -euo pipefail

DIR=${JAXEFF_SLURM_DIR:-/tmp/jaxeff-slurm}
CPUS=${JAXEFF_SLURM_CPUS:-8}
PORT=${JAXEFF_SLURM_PORT:-6817}
KILL_WAIT=${JAXEFF_SLURM_KILL_WAIT:-30}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
export SLURM_CONF=$CONF

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: $1" >&2; exit "${2:-1}"; }

check_tools() {
    local missing=() pkgs=()
    for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client sinfo:slurm-client; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "${pair%%:*}" >/dev/null 2>&1 \
            || { missing+=("${pair%%:*}"); [[ " ${pkgs[*]} " == *" ${pair##*:} "* ]] || pkgs+=("${pair##*:}"); }
    done
    if ((${#missing[@]})); then
        die "missing ${missing[*]} (Debian packages ${pkgs[*]}); install them with: apt-get install slurm-wlm munge" 2
    fi
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts the jobs' tasks; munged and slurmd run as root here)" 2
}

# The pid in $1 if that process is alive and runs the program $2, else nothing.
live_pid() {
    local file=$1 prog=$2 pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' </proc/"$pid"/cmdline | grep -q -- "$prog" || return 1
    echo "$pid"
}

write_config() {
    mkdir -p "$DIR"/{munge,state,spool,log}
    chmod 700 "$DIR" "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 600 "$DIR/munge/munge.key"
    fi
    cat >"$CONF" <<EOF
# Written by launch/slurm/local-cluster.sh: a one-node cluster in $DIR.
ClusterName=jaxeff-local
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also the seconds a requeued job waits before it may start again (default 120)
AuthInfo=socket=$SOCKET,cred_expire=${JAXEFF_SLURM_REQUEUE_DELAY:-10}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/plugstack.conf
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
# Look at pending jobs every 2 s (default 60), so that a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# Seconds between a job's SIGTERM (scancel, scontrol requeue, preemption) and SIGKILL: must cover one
# training step plus one checkpoint save (see launch/slurm/jaxeff.sbatch).
KillWait=$KILL_WAIT
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    : >"$DIR/plugstack.conf"
    cat >"$DIR/env.sh" <<EOF
# source this file to use the local cluster in $DIR (sbatch, squeue, scontrol, sinfo, ...)
export SLURM_CONF=$CONF
EOF
}

start() {
    check_tools
    write_config
    if live_pid "$DIR/munged.pid" munged >/dev/null; then
        say "munged already running"
    else
        # As root munged refuses some ownership layouts without --force; the key is private to this folder.
        munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munged.pid" \
            --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
            || die "munged failed to start; see $DIR/log/munged.log"
    fi
    if live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null; then
        say "slurmctld already running"
    else
        slurmctld -f "$CONF" || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
    fi
    if live_pid "$DIR/slurmd.pid" slurmd >/dev/null; then
        say "slurmd already running"
    else
        slurmd -f "$CONF" -N localhost || die "slurmd failed to start; see $DIR/log/slurmd.log"
    fi
    local state="" deadline=$((SECONDS + ${JAXEFF_SLURM_START_TIMEOUT:-60}))
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -n localhost -o %t 2>/dev/null | head -1 || true)
        case $state in
            idle|mix|alloc) break ;;
            down*|drain*|fail*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    case $state in
        idle|mix|alloc) ;;
        *) die "node localhost is '${state:-not reported}' after ${JAXEFF_SLURM_START_TIMEOUT:-60}s; see $DIR/log/" ;;
    esac
    say "up: node localhost ($CPUS CPUs) is $state, partition local; state, logs and config in $DIR"
    echo "To use it, run:  source $DIR/env.sh   (or: export SLURM_CONF=$CONF)"
    echo "export SLURM_CONF=$CONF"
}

# SIGTERM to each daemon it started (by the pid in its own pid file), together; SIGKILL after 10 s.
stop_daemons() {
    local name pid i t names=() pids=()
    for name in "$@"; do
        if pid=$(live_pid "$DIR/$name.pid" "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            names+=("$name") pids+=("$pid")
        else
            say "$name not running"
            rm -f "$DIR/$name.pid"
        fi
    done
    for i in "${!pids[@]}"; do
        pid=${pids[$i]} name=${names[$i]}
        for ((t = 0; t < 100; t++)); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        if [[ -d /proc/$pid ]]; then
            kill -KILL "$pid" 2>/dev/null || true
            say "$name ($pid) killed after 10 s"
        else
            say "$name ($pid) stopped"
        fi
        rm -f "$DIR/$name.pid"
    done
}

stop() {
    # A stopping slurmd leaves its jobs' tasks running: cancel the jobs left and give them KillWait to end.
    local i
    if live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null && [[ -f $CONF ]] \
            && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
        say "cancelling the jobs left: $(squeue -h -o %i | tr '\n' ' ')"
        scancel --partition=local >/dev/null 2>&1 || true
        for ((i = 0; i < 10 * (KILL_WAIT + 10); i++)); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
    stop_daemons slurmd slurmctld munged
}

status() {
    local rc=0 name pid
    for name in munged slurmctld slurmd; do
        if pid=$(live_pid "$DIR/$name.pid" "$name"); then
            say "$name running (pid $pid)"
        else
            say "$name not running"
            rc=3
        fi
    done
    if ((rc == 0)); then
        sinfo -N -o "%N %t %c" 2>&1 | sed 's/^/local-cluster: /'
        squeue 2>&1 | sed 's/^/local-cluster: /'
        echo "export SLURM_CONF=$CONF"
    fi
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status   (folder: \$JAXEFF_SLURM_DIR, now $DIR)" 2 ;;
esac
