#!/usr/bin/env bash
# A one-node Slurm on this machine, for tests/slurm_e2e.sh: munge, slurmctld and slurmd from the distribution's
# packages (apt-get install slurmctld slurmd slurm-client munge), GPUS fake GPUs for the gpu GRES (device files
# that stand for nothing), its configuration and state in DIR. Sourced: `. tests/slurm_local.sh DIR [GPUS]` exports
# SLURM_CONF and defines slurm_local_stop; returns 1 with one line where a binary is missing.
slurm_local_dir=$(realpath -m -- "$1")
slurm_local_gpus=${2:-2}
for bin in munged slurmctld slurmd sbatch scontrol; do
  if ! command -v "$bin" > /dev/null; then
    echo "skipped: no $bin here (apt-get install slurmctld slurmd slurm-client munge)"
    return 1
  fi
done
slurm_local_stop() {  # stop this Slurm's daemons (munge stays for others)
  pkill -x slurmd || true
  pkill -x slurmctld || true
  while pgrep -x slurmd > /dev/null || pgrep -x slurmctld > /dev/null; do sleep 0.2; done
}
slurm_local_stop  # an earlier start's
mkdir -p "$slurm_local_dir"/{state,spool} /run/munge
node=$(hostname -s)
devices=()
for ((i = 0; i < slurm_local_gpus; i++)); do
  [ -e "/dev/fakegpu$i" ] || mknod "/dev/fakegpu$i" c 1 3  # /dev/null's numbers: a GPU for Slurm's bookkeeping
  devices+=("/dev/fakegpu$i")
done
cat > "$slurm_local_dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$slurm_local_dir/state
SlurmdSpoolDir=$slurm_local_dir/spool
SlurmctldPidFile=$slurm_local_dir/slurmctld.pid
SlurmdPidFile=$slurm_local_dir/slurmd.pid
SlurmctldLogFile=$slurm_local_dir/slurmctld.log
SlurmdLogFile=$slurm_local_dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=3600
NodeName=$node CPUs=$(nproc) RealMemory=$(($(free -m | awk '/^Mem:/ {print $2}') * 3 / 4)) Gres=gpu:$slurm_local_gpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=2:00:00 State=UP
EOF
echo "NodeName=$node Name=gpu File=/dev/fakegpu[0-$((slurm_local_gpus - 1))]" > "$slurm_local_dir/gres.conf"
export SLURM_CONF=$slurm_local_dir/slurm.conf
pgrep -x munged > /dev/null || munged --force
slurmctld -c -f "$SLURM_CONF"  # -c: a clean state, no jobs from an earlier start
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  sinfo -h -o '%T' 2>/dev/null | grep -qx idle && break
  sleep 1
done
sinfo -h -o '%T' | grep -qx idle || { echo "the local Slurm did not come up: $slurm_local_dir/slurmctld.log"; return 1; }
