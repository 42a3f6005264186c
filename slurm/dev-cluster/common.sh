# shellcheck shell=bash disable=SC2034  # settings used by up.sh and down.sh
# Shared by up.sh and down.sh (sourced, never run). Settings, logging and process helpers of
# the single-node development Slurm cluster.

STATE="${MPQ_SLURM_STATE:-/var/lib/mpq-dev-cluster}"
# One accounting cluster per state folder: job ids restart at 1 with a new folder, and records of
# another folder's job 1 in the shared accounting database must never answer for this one's.
if [ -n "${MPQ_SLURM_CLUSTER:-}" ]; then
  CLUSTER="$MPQ_SLURM_CLUSTER"
elif [ "$STATE" = "/var/lib/mpq-dev-cluster" ]; then
  CLUSTER="mpqdev"
else
  CLUSTER="mpq$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)"
fi
PARTITION="${MPQ_SLURM_PARTITION:-debug}"
CPUS="${MPQ_SLURM_CPUS:-4}"                        # declared CPUs (config_overrides: may exceed the real count)
UP_TIMEOUT="${MPQ_SLURM_TIMEOUT:-60}"              # seconds up.sh waits for the cluster
STOP_TIMEOUT="${MPQ_SLURM_STOP_TIMEOUT:-20}"       # seconds between SIGTERM and SIGKILL in down.sh
NODE="$(hostname -s)"

ETC="$STATE/etc"          # slurm.conf, slurmdbd.conf
LOGDIR="$STATE/log"       # every daemon's log except munged's
RUNDIR="$STATE/run"       # pid files written by the Slurm daemons
STARTED="$STATE/started"  # one file per daemon this tool started, holding its pid
SPOOL="$STATE/spool"      # slurmctld state, slurmd spool
export SLURM_CONF="$ETC/slurm.conf"

DB_NAME="slurm_acct_db"
MYSQL_PIDFILE="/run/mysqld/mysqld.pid"   # from Debian's /etc/mysql/mariadb.conf.d/50-server.cnf
MUNGE_PIDFILE="/run/munge/munged.pid"    # munged's default

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

log() { printf '[dev-cluster] %s\n' "$*"; }
warn() { printf '[dev-cluster] WARNING: %s\n' "$*" >&2; }
die() { printf '[dev-cluster] ERROR: %s\n' "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" -eq 0 ] || die "run me as root: sudo bash $0"
}

# Serialise concurrent up.sh/down.sh runs on one state directory.
take_lock() {
  mkdir -p "$STATE"
  exec 9>"$STATE/lock"
  flock -w 120 9 || die "another up.sh/down.sh holds $STATE/lock"
}

# pid_alive PID NAME: PID is a live (non-zombie) process whose command name is NAME.
pid_alive() {
  local pid="$1" name="$2" comm state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
  [ "$comm" = "$name" ] || return 1
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" || return 1
  [ "$state" != "Z" ]
}

# read_pid FILE: first line of FILE, or nothing.
read_pid() {
  [ -r "$1" ] && head -n1 "$1" | tr -dc '0-9'
  return 0
}

# ours NAME: prints the pid of NAME if this tool started it and it is still alive.
ours() {
  local pid
  pid="$(read_pid "$STARTED/$1")"
  if pid_alive "$pid" "$1"; then echo "$pid"; return 0; fi
  return 1
}

# running NAME: some live process called NAME runs (started by us or not). Zombies do not count:
# a daemon that just exited may stay listed until init reaps it.
running() {
  local pid
  for pid in $(pgrep -x "$1" 2>/dev/null || true); do
    pid_alive "$pid" "$1" && return 0
  done
  return 1
}

# remove_stale_pidfile FILE NAME: delete FILE if the pid in it is not a live NAME.
remove_stale_pidfile() {
  local f="$1" name="$2" pid
  [ -e "$f" ] || return 0
  pid="$(read_pid "$f")"
  if ! pid_alive "$pid" "$name"; then
    rm -f "$f"
    log "removed stale pid file $f"
  fi
}

# stop_ours NAME: SIGTERM the NAME this tool started, SIGKILL it after STOP_TIMEOUT seconds,
# forget it. Leaves any NAME it did not start alone.
stop_ours() {
  local name="$1" pid i
  if ! pid="$(ours "$name")"; then
    if [ -e "$STARTED/$name" ]; then
      log "$name: started by dev-cluster but no longer running; forgetting it"
      rm -f "$STARTED/$name"
    elif running "$name"; then
      log "$name: running but not started by dev-cluster; leaving it alone"
    fi
    return 0
  fi
  log "$name: stopping pid $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    pid_alive "$pid" "$name" || break
    sleep 0.1
  done
  if pid_alive "$pid" "$name"; then
    warn "$name: still running after ${STOP_TIMEOUT}s; sending SIGKILL to pid $pid"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pid_alive "$pid" "$name" || break
      sleep 0.1
    done
    pid_alive "$pid" "$name" && die "$name: pid $pid survived SIGKILL"
  fi
  rm -f "$STARTED/$name"
  STOPPED_PIDS+=("$pid")
  log "$name: stopped"
}
STOPPED_PIDS=()

# reap_wait SECONDS: wait for the processes stop_ours stopped to leave the process table (an
# exited daemon stays a zombie until init reaps it; here init does so after a moment).
reap_wait() {
  local i pid left
  for ((i = 0; i < $1 * 10; i++)); do
    left=""
    for pid in "${STOPPED_PIDS[@]}"; do
      [ -e "/proc/$pid" ] && left+="$pid "
    done
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  log "exited but not yet reaped by init (zombies, harmless): $left"
}
