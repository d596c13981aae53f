#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and for trying the slurm launcher
# before a real cluster. Needs root and the Debian packages `slurm-wlm munge`.
#   scripts/slurm-local.sh up      writes /etc/slurm/slurm.conf for this machine (its cores
#                                  and memory), starts munged, slurmctld and slurmd with no
#                                  jobs left from an earlier start, and waits until `sinfo`
#                                  shows the node idle
#   scripts/slurm-local.sh down    cancels every job and stops them
#   scripts/slurm-local.sh status  exits 0 when the cluster answers
# Finished jobs are recorded in the job-completion log $SLURM_LOCAL/jobcomp.log.
set -euo pipefail

ROOT=${SLURM_LOCAL:-/var/lib/vitexp-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by vitexp scripts/slurm-local.sh"

die() { echo "slurm-local: error: $*" >&2; exit 1; }

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching it"
  fi
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)  # leave 20% to the OS
  mkdir -p "$ROOT"/{state,spool} /etc/slurm
  cat > "$CONF" <<EOF
$MARK
ClusterName=vitexp-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/slurmctld.log
SlurmdLogFile=$ROOT/slurmd.log
ReturnToService=2
MinJobAge=30
DefMemPerCPU=1024
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if munge -n >/dev/null 2>&1 </dev/null; then return; fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
}

wait_idle() {
  local host deadline state=""
  host=$(hostname -s)
  deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    state=$(timeout 10 sinfo -h -n "$host" -o %t 2>/dev/null || true)
    if [ "$state" = idle ]; then return; fi
    sleep 0.5
  done
  die "the node is '${state:-not answering}', not idle, after 60 s (squeue shows what holds it); see $ROOT/slurmctld.log and $ROOT/slurmd.log"
}

up() {
  [ "$(id -u)" = 0 ] || die "needs root (it starts munged, slurmctld and slurmd)"
  command -v slurmctld >/dev/null || die "Slurm is not installed: apt-get install -y slurm-wlm munge"
  if timeout 10 sinfo -h >/dev/null 2>&1; then wait_idle; echo "slurm-local: already up"; return; fi
  write_conf
  start_munge
  # -c: start clean; a job still queued or running at the last `down` would hold the node
  /usr/sbin/slurmctld -c
  /usr/sbin/slurmd
  wait_idle
  sinfo
}

down() {
  local jobs
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    scancel $jobs >/dev/null 2>&1 || true
    for _ in $(seq 40); do  # until slurmd has stopped their processes
      [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null || true)" ] && break
      sleep 0.25
    done
  fi
  scontrol shutdown >/dev/null 2>&1 || true
  for pidfile in "$ROOT/slurmctld.pid" "$ROOT/slurmd.pid"; do
    for _ in $(seq 40); do
      [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null || break
      sleep 0.25
    done
  done
  echo "slurm-local: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) timeout 10 sinfo -h >/dev/null 2>&1 ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
