#!/usr/bin/env bash
# A one-machine SLURM cluster for the `slurm` tests: munged + slurmctld + slurmd on 127.0.0.1, one
# node with this machine's cores, one partition. Idempotent: installs Debian's packages when missing,
# writes its own slurm.conf (refuses to replace one it did not write), starts only daemons that are
# not running, and returns once the node answers. Needs root (as CI runs); no systemd needed.
#   bash tests/cluster/start_slurm.sh        exit 0: `sinfo` shows the node up
set -euo pipefail
say() { echo "[start_slurm] $*" >&2; }
die() { echo "error: start_slurm: $*" >&2; exit 1; }

CONF=/etc/slurm/slurm.conf
MARK="# written by megatron_outeff tests/cluster/start_slurm.sh"
STATE=/var/lib/outeff-slurm
LOGS=/var/log/outeff-slurm
if [[ "$(id -u)" != 0 ]]; then  # a cluster root started earlier is fine; starting one needs root
    grep -qsF "$MARK" "$CONF" && sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated|completing)" && exit 0
    die "must run as root (installs packages, starts daemons); running as uid $(id -u)"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(slurmctld slurmd slurm-client munge)
    # the .deb files are kept in the repository's .cache (beside the torch extensions) for a cached CI
    debs="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.cache/apt/archives"
    mkdir -p "$debs/partial"
    install=(apt-get install -y -q --no-install-recommends -o "Dir::Cache::archives=$debs" "${pkgs[@]}")
    "${install[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && "${install[@]}" >/dev/null; } \
        || die "apt-get install ${pkgs[*]} failed"
fi

# munge: a key, then the daemon as the munge user.
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer"
fi

# slurm.conf: ours, or none (never overwrite a real cluster's).
HOST="$(hostname -s)"
# every CPU of the machine: nproc alone obeys OMP_NUM_THREADS (a test shell often sets it to 1), and a
# node that slurm thinks has 1 CPU leaves the 2-task test jobs pending forever (PartitionConfig)
CPUS="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
if [[ -f "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace it"
fi
mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d" "$LOGS" /run/outeff-slurm
NEW_CONF="$(cat <<EOF
$MARK
ClusterName=outeff-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/outeff-slurm/slurmctld.pid
SlurmdPidFile=/run/outeff-slurm/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=60
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=600
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
)"
if [[ ! -f "$CONF" ]] || [[ "$(cat "$CONF")" != "$NEW_CONF" ]]; then
    say "writing $CONF ($HOST, $CPUS CPUs)"
    printf '%s\n' "$NEW_CONF" > "$CONF"
    RECONF=1
fi

alive() { [[ -f "$1" ]] && grep -qs '^State:[[:space:]]*[^Z]' "/proc/$(cat "$1")/status"; }  # not a zombie
for daemon in slurmctld slurmd; do
    pidfile="/run/outeff-slurm/$daemon.pid"
    if [[ -n "${RECONF:-}" ]] && alive "$pidfile"; then  # some settings are read only at start
        say "restarting $daemon for the new configuration"
        kill "$(cat "$pidfile")"
        for _ in $(seq 100); do alive "$pidfile" || break; sleep 0.1; done
    fi
    if ! alive "$pidfile"; then
        say "starting $daemon"
        if [[ $daemon == slurmctld ]]; then slurmctld -i; else slurmd; fi  # -i: ignore unmatched state
    fi
done
for _ in $(seq 100); do
    state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
    case "$state" in
        idle*|mixed*|allocated*|completing*) say "cluster up: node $HOST $state"; exit 0 ;;
        drain*|down*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
die "node $HOST not up after 20 s (state '${state:-no answer}'); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
