#!/usr/bin/env bash
# Start a single-node Slurm (Debian's slurmctld + slurmd + munge, no systemd) for the executor=slurm tests.
# Idempotent: does nothing when a controller already answers. Needs root. Exit 0 with an idle node, else 1
# with the reason on stderr (the tests then skip and print why).
set -uo pipefail

fail() { echo "slurm-up: $*" >&2; exit 1; }
idle() { sinfo -h -o %T 2>/dev/null | grep -qE '^idle'; }

command -v sinfo >/dev/null && idle && { echo "slurm-up: a Slurm node is already idle"; exit 0; }
[ "$(id -u)" = 0 ] || fail "needs root to install and start slurmctld/slurmd"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || fail "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# munge authenticates the daemons to each other
mkdir -p /run/munge && chown munge:munge /run/munge
[ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; } >/dev/null 2>&1
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    su -s /bin/sh munge -c /usr/sbin/munged || fail "munged did not start"
    sleep 1
    munge -n | unmunge >/dev/null 2>&1 || fail "munged does not answer"
fi

host=$(hostname -s)
# advertise more CPUs than there are, so tests can run several one-CPU tasks side by side
cpus=${SLURM_CI_CPUS:-8}
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
JobRequeue=1
MinJobAge=600
SchedulerParameters=defer_batch=0
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# daemons from an earlier try with another config: stop them by their pid files
for name in slurmctld slurmd; do
    if [ -f /run/$name.pid ]; then kill "$(cat /run/$name.pid)" 2>/dev/null; rm -f /run/$name.pid; fi
done
sleep 1
slurmctld -c || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
slurmd || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"
for _ in $(seq 30); do
    idle && { echo "slurm-up: node ${host} idle"; exit 0; }
    sinfo -h -o %T 2>/dev/null | grep -qE 'drain|inval|down' && scontrol update NodeName="$host" State=RESUME 2>/dev/null
    sleep 1
done
fail "no idle node after 30 s: $(sinfo -h 2>&1 | head -3)"
