#!/usr/bin/env bash
# A Slurm cluster on this one machine, on loopback addresses only, for trying the Slurm scripts
# (launchers/*.sbatch) and for the tests that run them. Needs root (Slurm's daemons and munge).
#
#   scripts/local_slurm.sh up [DIR] [NODES]   # install (Debian: slurm-wlm, munge) when absent, start
#   export SLURM_CONF=DIR/slurm.conf          # then sbatch/squeue/scontrol/scancel talk to it
#   scripts/local_slurm.sh down DIR           # stop every daemon it started, remove DIR
#
# DIR holds a munge key made by this `up`, slurm.conf, state, spool and logs (munge's socket lives in a
# /tmp/xtra-munge.* folder of its own); nothing under /etc is changed. Without DIR (or with DIR '', to
# give NODES) `up` makes a fresh folder, $TMPDIR/xtra-slurm.XXXXXX, and prints it; a DIR that already
# exists, or is a symlink, is refused rather than trusted, and `down` removes only a folder `up` made
# (scripts/local_dir.sh). NODES slurmd daemons (default 1) emulate that many
# nodes (n1, n2, … on ports 16818+, all on 127.0.0.1: with NoInAddrAny a slurmd binds to the address
# of the host name, so other loopback addresses cannot be used); one node is named after the host.
# No cgroups, no accounting.
# Requeued jobs start again ~12 s later (cred_expire=10, the least Slurm allows, plus the scheduler's
# 2 s interval); Slurm's own time-limit warnings (--signal=…@N) are checked every 30 s.
set -euo pipefail
source "$(dirname "$0")/local_dir.sh"
MARKER=.xtra-local-slurm

ACTION=${1:-}
DIR=${2:-}
NODES=${3:-1}

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
    bash "$(dirname "$0")/install_debian_packages.sh" slurm-wlm munge
}

up() {
    new_dir xtra-slurm "$DIR"
    install_if_missing
    mkdir -m 700 "$BASE"/{munge,run,state,log}
    # With NoInAddrAny each daemon binds to the address its host name resolves to. Where this host's
    # name is not a loopback address, the daemons get a UTS namespace of their own named localhost.
    local host cpus mem wrap=()
    host=$(hostname -s); cpus=$(nproc)
    if ! getent ahostsv4 "$host" | awk '{print $1}' | grep -q '^127\.'; then
        host=localhost
        wrap=(unshare --uts sh -c 'hostname localhost && exec "$0" "$@"')
        "${wrap[@]}" true || { echo "$(hostname -s) does not resolve to a loopback address and unshare --uts" \
            "is not permitted here: the Slurm daemons would listen on a public address" >&2; exit 3; }
    fi
    # munged wants every directory above its socket searchable by all, which DIR's parents may not be
    local sock_dir
    sock_dir=$(mktemp -d /tmp/xtra-munge.XXXXXX); chmod 755 "$sock_dir"; echo "$sock_dir" > "$BASE/run/munge_dir"
    # BASE was empty a moment ago: the key is new (mungekey would stop at a file already there)
    mungekey -c -k "$BASE/munge/munge.key" -b 1024
    munged --key-file="$BASE/munge/munge.key" --socket="$sock_dir/munge.sock" --pid-file="$BASE/run/munged.pid" \
        --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munged.seed"
    mem=$(( $(free -m | awk '/^Mem:/{print $2}') * 8 / 10 / NODES ))
    cat > "$BASE/slurm.conf" <<CONF
ClusterName=xtralocal
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SrunPortRange=16900-16999
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock_dir/munge.sock,cred_expire=10
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd-%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2,kill_invalid_depend
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=300
CONF
    local names="" name
    for i in $(seq 1 "$NODES"); do
        # one node is named as the host, so that the job's node list (the rendezvous address of
        # launchers/slurm_pretrain.sbatch) resolves; emulated nodes n1…nN do not (set MASTER_ADDR)
        if [ "$NODES" = 1 ]; then name=$host; else name=n$i; fi
        echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$((16817 + i)) CPUs=$cpus RealMemory=$mem" \
            "State=UNKNOWN" >> "$BASE/slurm.conf"
        names="$names${names:+,}$name"; mkdir -p "$BASE/spool/slurmd-$name"
    done
    echo "PartitionName=local Nodes=$names Default=YES MaxTime=INFINITE State=UP" >> "$BASE/slurm.conf"
    export SLURM_CONF=$BASE/slurm.conf
    setsid "${wrap[@]}" slurmctld -D -c -f "$SLURM_CONF" >"$BASE/log/slurmctld.out" 2>&1 </dev/null &
    for name in ${names//,/ }; do
        setsid "${wrap[@]}" slurmd -D -N "$name" -f "$SLURM_CONF" >"$BASE/log/slurmd-$name.out" 2>&1 </dev/null &
    done
    for _ in $(seq 1 120); do
        if [ "$(sinfo -h -o '%T %D' 2>/dev/null)" = "idle $NODES" ]; then
            echo "Slurm is up ($NODES node(s), $cpus CPUs each): export SLURM_CONF=$SLURM_CONF"; return
        fi
        sleep 0.5
    done
    echo "Slurm did not come up; its logs are in $BASE/log" >&2
    exit 1
}

down() {
    [ -n "$DIR" ] || refuse "usage: $0 down DIR (the folder '$0 up' printed)"
    own_dir "$DIR" || { echo "nothing at $DIR"; return 0; }
    export SLURM_CONF=$BASE/slurm.conf
    # Jobs first (a job's processes outlive a killed slurmstepd), Slurm next (its shutdown needs munge),
    # then whatever did not stop, then munged.
    if [ -f "$SLURM_CONF" ] && timeout 20 scancel --full --user="$(id -un)" >/dev/null 2>&1; then
        for _ in $(seq 1 60); do
            [ -z "$(timeout 10 squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    [ -f "$SLURM_CONF" ] && timeout 20 scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 1 20); do
        compgen -G "$BASE/run/slurm*.pid" >/dev/null || break
        sleep 0.25
    done
    local pidfile pid sock_dir
    for pidfile in "$BASE"/run/slurm*.pid; do
        if pid=$(pid_from "$pidfile" "$SLURM_CONF"); then kill -9 "$pid" 2>/dev/null || true; fi
    done
    pkill -9 -f "slurm(ctld|d|stepd).* -f $SLURM_CONF" 2>/dev/null || true
    # the socket folder `up` made with mktemp: only a real one of that name, never through a symlink
    sock_dir=$(cat "$BASE/run/munge_dir" 2>/dev/null || true)
    if [[ $sock_dir =~ ^/tmp/xtra-munge\.[A-Za-z0-9]{6}$ ]] && [ -d "$sock_dir" ] && [ ! -L "$sock_dir" ] \
        && [ -O "$sock_dir" ]; then
        [ -S "$sock_dir/munge.sock" ] && { munged --socket="$sock_dir/munge.sock" --stop >/dev/null 2>&1 || true; }
        rm -rf -- "$sock_dir"
    fi
    if pid=$(pid_from "$BASE/run/munged.pid" "$BASE/munge/munge.key"); then kill "$pid" 2>/dev/null || true; fi
    rm -rf -- "$BASE"
    echo "Slurm is down"
}

case "$ACTION" in
    up) up ;;
    down) down ;;
    *) echo "usage: scripts/local_slurm.sh up [DIR] [NODES] | down DIR" >&2; exit 2 ;;
esac
