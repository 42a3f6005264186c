#!/usr/bin/env bash
# Tear down the development Slurm cluster that up.sh brought up: cancel every job, then stop,
# in reverse order, only the daemons up.sh started (slurmd, slurmctld, slurmdbd, mariadbd,
# munged): SIGTERM, then SIGKILL after MPQ_SLURM_STOP_TIMEOUT (20 s). Daemons that were already
# running before up.sh are left alone. Stale pid files are removed. Configuration, logs and the
# accounting database stay (the next up.sh reuses them). Idempotent.
#
#   sudo bash slurm/dev-cluster/down.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

require_root

cleanup_pidfiles() {
  local d
  for d in slurmctld slurmd slurmdbd; do
    remove_stale_pidfile "$RUNDIR/$d.pid" "$d"
    remove_stale_pidfile "/run/$d.pid" "$d"
  done
  remove_stale_pidfile "$MUNGE_PIDFILE" munged
  remove_stale_pidfile "$MYSQL_PIDFILE" mariadbd
}

if [ ! -d "$STATE" ]; then
  log "no state directory $STATE: nothing was started by up.sh"
  cleanup_pidfiles
  exit 0
fi
take_lock

# ---------------------------------------------------------------- cancel every job
if ours slurmctld >/dev/null; then
  if [ -n "$(squeue -h -o %i 2>/dev/null | head -n1)" ]; then
    users="$(squeue -h -o %u 2>/dev/null | sort -u)"
    for u in $users; do
      log "cancelling the jobs of $u"
      scancel --user="$u" 2>/dev/null || warn "scancel --user=$u failed"
    done
    for ((i = 0; i < 150; i++)); do # up to 15 s: KillWait=5 plus margin
      [ -z "$(squeue -h -o %i 2>/dev/null | head -n1)" ] && break
      sleep 0.1
    done
    left="$(squeue -h -o '%i %T' 2>/dev/null | tr '\n' ' ')"
    if [ -n "$left" ]; then
      warn "jobs still listed after cancelling: $left"
    else
      log "all jobs ended"
    fi
  fi
elif running slurmctld; then
  log "slurmctld was not started by dev-cluster: not cancelling any job"
fi

# ---------------------------------------------------------------- stop, in reverse order
slurmd_was_ours=0
ours slurmd >/dev/null && slurmd_was_ours=1
stop_ours slurmd
if [ "$slurmd_was_ours" -eq 1 ]; then
  # slurmstepd ignores SIGTERM: SIGKILL, by pid, the ones our slurmd started (they inherit its
  # SLURM_CONF), should any outlive the cancelled jobs.
  for pid in $(pgrep -x slurmstepd || true); do
    if { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"; then
      warn "killing leftover slurmstepd pid $pid"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
fi
stop_ours slurmctld
stop_ours slurmdbd
stop_ours mariadbd
stop_ours munged

cleanup_pidfiles
[ ${#STOPPED_PIDS[@]} -eq 0 ] || reap_wait 5
log "down (configuration, logs and accounting database kept in $STATE)"
