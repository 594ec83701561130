#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for CI and tests (Debian's slurm + munge).
#
#   bash slurm/ci_cluster.sh install   # apt-get the packages (and shellcheck) if missing (root; idempotent)
#   bash slurm/ci_cluster.sh start     # write slurm.conf, start munged/slurmctld/slurmd, wait for idle
#   bash slurm/ci_cluster.sh status    # sinfo / squeue of that cluster
#   bash slurm/ci_cluster.sh stop      # cancel its jobs, kill the daemons by their recorded PIDs
#
# Everything lives in one state folder, $RNNDDP_SLURM_DIR (default /tmp/rnnddp-slurm): slurm.conf,
# daemon state, logs and `pids` (one "name pid" per line, only for daemons this script started).
# Nothing is written to /etc/slurm: point clients at the cluster with
#   export SLURM_CONF=$RNNDDP_SLURM_DIR/slurm.conf
# (`start` prints that line; sbatch hands SLURM_CONF on to its jobs, so srun/scontrol inside work).
# Ports: SLURM_CI_CTLD_PORT (6817) and SLURM_CI_SLURMD_PORT (6818). Needs root and no systemd.
# The configuration follows ../shared/SLURM_CI.md (what was seen to work on these machines).
set -euo pipefail

DIR="${RNNDDP_SLURM_DIR:-${TMPDIR:-/tmp}/rnnddp-slurm}"
CONF="$DIR/slurm.conf"
PIDS="$DIR/pids"
CTLD_PORT="${SLURM_CI_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_CI_SLURMD_PORT:-6818}"
PACKAGES=(slurmctld slurmd slurm-client munge)

die() {
  echo "ci_cluster: $*" >&2
  exit 1
}
log() { echo "ci_cluster: $*" >&2; }

have_all() {
  local cmd
  for cmd in slurmctld slurmd sbatch sinfo munged munge unmunge; do
    command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || return 1
  done
}

cmd_install() {
  local lint=(shellcheck) # optional: tests/e2e/test_slurm.py lints slurm/ with it when present
  command -v shellcheck >/dev/null 2>&1 && lint=()
  if have_all && [[ ${#lint[@]} -eq 0 ]]; then
    log "slurm, munge and shellcheck are installed"
    return 0
  fi
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    have_all && {
      log "slurm and munge are installed (shellcheck is not: no root/apt-get to install it)"
      return 0
    }
    die "installing ${PACKAGES[*]} needs root and apt-get; install them with this system's package manager"
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if ! have_all; then
    # --no-install-recommends: leaves out PMIx and friends, which a MpiDefault=none cluster does not need.
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    have_all || die "apt-get finished but slurm/munge commands are still missing"
    log "installed ${PACKAGES[*]}"
  fi
  if [[ ${#lint[@]} -gt 0 ]]; then
    apt-get install -y -qq --no-install-recommends shellcheck >/dev/null || log "warning: shellcheck not installed"
  fi
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The PID recorded for a daemon name, or nothing.
recorded_pid() { [[ -f "$PIDS" ]] && awk -v n="$1" '$1 == n { print $2 }' "$PIDS" | tail -n1; }

write_conf() {
  local host cpus
  host="$(hostname -s)"
  cpus="$(nproc)"
  mkdir -p "$DIR/state/ctld" "$DIR/state/d" "$DIR/log"
  # cred_expire=10 and the short scheduler intervals: a requeued job runs again in seconds,
  # not after ~157 s (see SLURM_CI.md). No accounting daemon: sacct is unavailable, use scontrol.
  cat >"$CONF" <<EOF
ClusterName=ci
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
MailProg=/bin/true
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/state/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

# Read a daemon's PID file (it daemonizes; the file appears a moment later).
wait_pidfile() {
  local file="$1" i
  for ((i = 0; i < 100; i++)); do
    if [[ -s "$file" ]] && alive "$(cat "$file")"; then
      cat "$file"
      return 0
    fi
    sleep 0.1
  done
  return 1
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "reusing the munged already running (not recorded: stop leaves it alone)"
    return 0
  fi
  [[ -f /etc/munge/munge.key ]] || mungekey --create
  install -d -o munge -g munge -m 0755 /run/munge
  # --force: a stale socket from a killed munged would otherwise block the start.
  runuser -u munge -- /usr/sbin/munged --force
  local pid
  pid="$(wait_pidfile /run/munge/munged.pid)" || die "munged did not start"
  echo "munged $pid" >>"$PIDS"
  munge -n | unmunge >/dev/null || die "munged runs (pid $pid) but munge -n | unmunge fails"
}

cmd_start() {
  [[ $(id -u) -eq 0 ]] || die "starting slurmd and munged needs root"
  have_all || die "slurm/munge are not installed: run '$0 install' first"
  mkdir -p "$DIR"
  if alive "$(recorded_pid slurmctld)" && alive "$(recorded_pid slurmd)"; then
    log "already running from $DIR"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  local port
  for port in "$CTLD_PORT" "$SLURMD_PORT"; do
    port_busy "$port" && die "port $port is in use (another SLURM?); set SLURM_CI_CTLD_PORT / SLURM_CI_SLURMD_PORT"
  done
  : >"$PIDS"
  write_conf
  export SLURM_CONF="$CONF"
  start_munge
  # -c: start from a clean job state (a leftover state folder must not resurrect old jobs).
  slurmctld -c
  echo "slurmctld $(wait_pidfile "$DIR/state/slurmctld.pid" || die "slurmctld did not start; see $DIR/log/slurmctld.log")" >>"$PIDS"
  slurmd
  echo "slurmd $(wait_pidfile "$DIR/state/slurmd.pid" || die "slurmd did not start; see $DIR/log/slurmd.log")" >>"$PIDS"
  local i state=""
  for ((i = 0; i < 300; i++)); do
    state="$(sinfo -h -o %T 2>/dev/null || true)"
    [[ "$state" == idle ]] && break
    sleep 0.2
  done
  [[ "$state" == idle ]] || die "node not idle after 60 s (sinfo: '${state}'); see $DIR/log/"
  log "cluster up: $(tr '\n' ' ' <"$PIDS")"
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  [[ -f "$PIDS" ]] || {
    log "nothing recorded in $PIDS"
    return 0
  }
  if alive "$(recorded_pid slurmctld)"; then
    # Cancel this cluster's jobs first, so no slurmstepd or training process outlives the daemons.
    export SLURM_CONF="$CONF"
    scancel --partition=debug 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
      [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
      sleep 0.2
    done
  fi
  local name pid i
  # Reverse order of start: slurmd, slurmctld, then munged (if this script started it).
  while read -r name pid; do
    alive "$pid" || continue
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null
    log "stopped $name ($pid)"
  done < <(tac "$PIDS")
  rm -f "$PIDS"
}

cmd_status() {
  export SLURM_CONF="$CONF"
  [[ -f "$PIDS" ]] && cat "$PIDS"
  sinfo
  squeue
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 install|start|stop|status   (state folder: \$RNNDDP_SLURM_DIR, default /tmp/rnnddp-slurm)" >&2
    exit 2
    ;;
esac
