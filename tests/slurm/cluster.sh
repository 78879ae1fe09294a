#!/usr/bin/env bash
# A one-node Slurm "cluster" for tests/slurm.rs, no systemd: munged,
# slurmctld -D and slurmd -D started by PID in DIR, on 127.0.0.1, with two
# fake GPUs (gres.conf AutoDetect=off over plain device files) for the
# scheduler's bookkeeping. Meant to run inside `unshare --net` (the test
# does): the daemons bind every address of a network namespace that has
# only loopback, so nothing is reachable from outside.
#   cluster.sh start DIR   -> prints `export SLURM_CONF=...` once the node is idle
#   cluster.sh stop DIR    -> ends the daemons by their PIDs
set -euo pipefail
cmd="$1"; dir="$(realpath -m "$2")"
case "$cmd" in
stop)
  for p in slurmd slurmctld munged; do
    [ -f "$dir/$p.pid" ] && kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
  done
  exit 0 ;;
start) ;;
*) echo "usage: cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
mkdir -p "$dir"/{munge,state,spool,log,dev}
ip link set lo up
# Slurm resolves its listening address with AI_ADDRCONFIG, which finds
# nothing where only 127.0.0.1 exists: one more address on the namespace's
# own loopback (which leads nowhere else) satisfies it.
ip addr add 10.253.0.1/32 dev lo 2>/dev/null || true
# munge: its own key, socket and files in DIR.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
: > "$dir/dev/nvidia0"; : > "$dir/dev/nvidia1"
cpus=$(nproc)
cat > "$dir/slurm.conf" <<CONF
ClusterName=convflow-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MaxArraySize=10001
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=16000 Gres=gpu:2 State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
cat > "$dir/gres.conf" <<CONF
AutoDetect=off
NodeName=localhost Name=gpu File=$dir/dev/nvidia[0-1]
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -D -f "$SLURM_CONF" > "$dir/log/slurmctld.out" 2>&1 &
echo $! > "$dir/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" -N localhost > "$dir/log/slurmd.out" 2>&1 &
echo $! > "$dir/slurmd.pid"
for _ in $(seq 1 60); do
  if sinfo -h -o %t 2>/dev/null | grep -q '^idle'; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "slurm did not come up; logs in $dir/log:" >&2
tail -n 20 "$dir"/log/* >&2
exit 1
