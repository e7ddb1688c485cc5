#!/usr/bin/env bash
# A one-node Slurm on this machine, for the tests marked `slurm` (tests/test_slurm*.py) and for trying the
# scripts in examples/slurm/ by hand. No systemd: munged runs as user munge, slurmctld and slurmd as root,
# each started here and stopped by the pid it wrote.
#
#   bash .ci/slurm.sh start    install (Debian: slurmctld slurmd slurm-client munge) once, start, wait idle
#   bash .ci/slurm.sh stop     cancel every job, stop the three daemons by pid
#   bash .ci/slurm.sh status   exit 0 when all three run and the node answers
#
# Every command is idempotent. The node is `hostname -s` on 127.0.0.1 with `nproc` CPUs; no accounting
# (sacct does not work: read jobs with `scontrol show job`, kept for MinJobAge seconds after they end);
# proctrack/linuxproc and task/none because there is no cgroup hierarchy to own in a container.
# A requeued job normally waits cred_expire+1 s (120 s) before it may start again; here cred_expire is 5 s
# so the requeue tests stay short. A real cluster keeps its own value.
set -euo pipefail

STATE=${FOLDTRON_SLURM_STATE:-/var/spool/foldtron-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by foldtron .ci/slurm.sh; a hand-written slurm.conf is never overwritten"
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$STATE/slurmctld.pid
SLURMD_PID=$STATE/slurmd.pid
NODE=$(hostname -s)

log() { echo "slurm.sh: $*" >&2; }
die() { log "$*"; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "needs root (or passwordless sudo) to run: $*"
  fi
}

alive() {  # alive PIDFILE: the process named in PIDFILE runs
  local pid
  [ -r "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

install_packages() {
  local need=()
  command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
  command -v munged >/dev/null 2>&1 || need+=(munge)
  command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)  # for tests/test_slurm_scripts.py
  [ "${#need[@]}" -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get: install Slurm + munge by hand"
  log "installing ${need[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away to use the test cluster"
  fi
  as_root mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
  local cpus tmp
  cpus=$(nproc)
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARK
ClusterName=foldtron-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# How long a requeued job is held before it may run again (cred_expire + 1 s); Slurm's default is 120.
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Scheduling passes every few seconds (defaults: 60 s main, 30 s backfill): a requeued job whose hold ended
# starts at the next pass, and the tests wait for it.
SchedulerParameters=sched_interval=5,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Seconds between SIGTERM and SIGKILL at a time limit or scancel: the window a checkpoint must fit in.
KillWait=30
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  as_root install -m 0644 "$tmp" "$CONF"
  rm -f "$tmp"
}

start_munge() {
  alive "$MUNGE_PID" && return 0
  as_root mkdir -p /run/munge /var/lib/munge /var/log/munge
  as_root chown munge:munge /run/munge /var/lib/munge /var/log/munge
  as_root chmod 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    as_root mkdir -p /etc/munge
    as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    as_root chown munge:munge /etc/munge/munge.key
    as_root chmod 0400 /etc/munge/munge.key
  fi
  as_root runuser -u munge -- /usr/sbin/munged --force
  local i
  for i in $(seq 50); do alive "$MUNGE_PID" && return 0; sleep 0.1; done
  die "munged did not start (see /var/log/munge/munged.log); pid file $MUNGE_PID (tried $i times)"
}

wait_idle() {
  local i state
  for i in $(seq 120); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|allocated*) return 0 ;;
      down*|drain*)
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $NODE did not become idle (state: ${state:-no answer} after $i tries); see $STATE/slurmctld.log and $STATE/slurmd.log"
}

start() {
  install_packages
  write_conf
  start_munge
  alive "$CTLD_PID" || as_root slurmctld
  alive "$SLURMD_PID" || as_root slurmd
  wait_idle
  log "running: node $NODE, $(nproc) CPUs, logs in $STATE"
}

stop_pid() {  # stop_pid PIDFILE NAME: SIGTERM, then SIGKILL after 15 s
  local pid i
  alive "$1" || { as_root rm -f "$1"; return 0; }
  pid=$(cat "$1")
  as_root kill "$pid" 2>/dev/null || true
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$2 (pid $pid) ignored SIGTERM for $((i / 10)) s; killing"
    as_root kill -9 "$pid" 2>/dev/null || true
  fi
  as_root rm -f "$1"
}

stop() {
  if alive "$CTLD_PID"; then
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086  # one argument per job id
      scancel $jobs 2>/dev/null || true
      for i in $(seq 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_pid "$SLURMD_PID" slurmd
  stop_pid "$CTLD_PID" slurmctld
  stop_pid "$MUNGE_PID" munged
  log "stopped"
}

status() {
  local ok=0 name file
  for name in munged slurmctld slurmd; do
    case $name in munged) file=$MUNGE_PID ;; slurmctld) file=$CTLD_PID ;; *) file=$SLURMD_PID ;; esac
    if alive "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: stopped"; ok=1; fi
  done
  if [ "$ok" -eq 0 ]; then sinfo -N -o "%N %T %c" || ok=1; fi
  return "$ok"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
