#!/usr/bin/env bash
# Bring up a single-node development Slurm cluster with accounting on this Debian machine:
# munged, MariaDB (socket only), slurmdbd, slurmctld and slurmd, each started only if it is not
# already running, and remembered in $MPQ_SLURM_STATE/started/ so that down.sh stops exactly
# what this script started. Idempotent: run it again while the cluster is up and it only checks.
#
#   sudo bash slurm/dev-cluster/up.sh && source /var/lib/mpq-dev-cluster/env.sh
#
# Settings (environment): MPQ_SLURM_STATE (/var/lib/mpq-dev-cluster), MPQ_SLURM_CPUS (4),
# MPQ_SLURM_TIMEOUT (60 s), MPQ_SLURM_CLUSTER (mpqdev), MPQ_SLURM_PARTITION (debug).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$HERE/common.sh"

require_root

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  printf '[dev-cluster] ERROR: missing Debian packages: %s\n' "${missing[*]}" >&2
  printf '[dev-cluster] install them, then run this again:\n' >&2
  printf '        apt-get update && apt-get install -y --no-install-recommends %s\n' "${PACKAGES[*]}" >&2
  exit 1
fi
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "MPQ_SLURM_CPUS must be a positive integer, not '$CPUS'"
[[ "$UP_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "MPQ_SLURM_TIMEOUT must be a positive integer, not '$UP_TIMEOUT'"

take_lock
DEADLINE=$((SECONDS + UP_TIMEOUT))

# wait_until DESCRIPTION COMMAND...: retry COMMAND until it succeeds or the deadline passes.
wait_until() {
  local what="$1"
  shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= DEADLINE)); then
      warn "timed out after ${UP_TIMEOUT}s waiting for $what (MPQ_SLURM_TIMEOUT)"
      return 1
    fi
    sleep 0.25
  done
}

# show_log FILE: the end of a daemon's log, for a failure message.
show_log() {
  [ -s "$1" ] || return 0
  printf '[dev-cluster] --- last lines of %s ---\n' "$1" >&2
  tail -n 15 "$1" >&2
}

# pidfile_live PIDFILE NAME: PIDFILE holds the pid of a live NAME.
pidfile_live() { pid_alive "$(read_pid "$1")" "$2"; }

# remember NAME PIDFILE: wait for the daemon's pid file and record the pid as started by us.
remember() {
  local name="$1" pidfile="$2" pid=""
  if wait_until "$name to write $pidfile" pidfile_live "$pidfile" "$name"; then
    pid="$(read_pid "$pidfile")"
  fi
  pid_alive "$pid" "$name" || return 1
  echo "$pid" >"$STARTED/$name"
  log "$name: started (pid $pid)"
}

# status_of NAME: a log line saying NAME is already up, and by whom.
status_of() {
  local pid
  if pid="$(ours "$1")"; then
    log "$1: already running (started by dev-cluster, pid $pid)"
  else
    log "$1: already running (not started by dev-cluster; it will be left alone by down.sh)"
  fi
}

# ---------------------------------------------------------------- host name
if ! getent hosts "$NODE" >/dev/null; then
  log "host name $NODE does not resolve; adding '127.0.0.1 $NODE' to /etc/hosts"
  printf '127.0.0.1 %s\n' "$NODE" >>/etc/hosts
fi

# ---------------------------------------------------------------- directories
install -d -o root -g root -m 755 "$STATE" "$ETC" "$STARTED" "$SPOOL"
install -d -o slurm -g slurm -m 755 "$LOGDIR" "$RUNDIR"
install -d -o slurm -g slurm -m 700 "$SPOOL/slurmctld"
install -d -o root -g root -m 755 "$SPOOL/slurmd"
for f in slurmctld slurmd slurmdbd; do
  touch "$LOGDIR/$f.log"
  chown slurm:slurm "$LOGDIR/$f.log"
done
touch "$LOGDIR/mariadb.log"
chown mysql:mysql "$LOGDIR/mariadb.log"

# ---------------------------------------------------------------- configuration
mem="$(env -u SLURM_CONF slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9][0-9]*\).*/\1/p' | head -n1)"
[ -n "$mem" ] || die "could not read RealMemory from 'slurmd -C'"
mem=$((mem * 95 / 100))

# Bind the daemons' listening sockets to the address the host name resolves to (instead of
# 0.0.0.0) when that address is a loopback one: Slurm binds to what getaddrinfo() gives for the
# host name. Inside a loopback-only network namespace (the test suite's `unshare -n`)
# getaddrinfo's AI_ADDRCONFIG finds no IPv4 address at all, Slurm could not resolve its own name
# with those options, and "all addresses" is loopback only anyway: no options there.
comm_params="" dbd_comm_params=""
host_addr="$({ getent ahostsv4 "$(hostname)" 2>/dev/null || true; } | awk 'NR == 1 {print $1}')"
if [[ "$host_addr" == 127.* ]]; then
  comm_params="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  dbd_comm_params="CommunicationParameters=NoInAddrAny" # undocumented there, but read (22.05)
elif [ -z "$host_addr" ] && ! ip -o -4 addr show scope global 2>/dev/null | grep -q .; then
  log "loopback-only network namespace: the daemons listen on all addresses, which here are loopback only"
else
  warn "$(hostname) resolves to '${host_addr:-nothing}', not a loopback address: the Slurm daemons will listen on all addresses"
fi

slurm_conf="# Written by slurm/dev-cluster/up.sh; rewritten on the next up.sh while the cluster is down.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmdTimeout=300
$comm_params
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
"
slurmdbd_conf="# Written by slurm/dev-cluster/up.sh
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
$dbd_comm_params
SlurmUser=slurm
LogFile=$LOGDIR/slurmdbd.log
PidFile=$RUNDIR/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=$DB_NAME
"

slurm_daemons_ours=""
for d in slurmdbd slurmctld slurmd; do
  ours "$d" >/dev/null && slurm_daemons_ours+="$d "
done
# write_conf FILE CONTENT OWNER MODE: (re)write FILE unless our daemons run with its old content.
write_conf() {
  local file="$1" content="$2" owner="$3" mode="$4"
  if [ -f "$file" ] && [ "$(cat "$file")" = "${content%$'\n'}" ]; then
    chown "$owner" "$file"
    chmod "$mode" "$file"
    return 0
  fi
  if [ -f "$file" ] && [ -n "$slurm_daemons_ours" ]; then
    warn "$file would change but ${slurm_daemons_ours}run with the old one: keeping it (run down.sh, then up.sh, to apply)"
    return 0
  fi
  printf '%s' "$content" >"$file.tmp"
  chown "$owner" "$file.tmp"
  chmod "$mode" "$file.tmp"
  mv -f "$file.tmp" "$file"
  log "wrote $file"
}
write_conf "$ETC/slurm.conf" "$slurm_conf" root:root 644
write_conf "$ETC/slurmdbd.conf" "$slurmdbd_conf" slurm:slurm 600
printf '# Written by slurm/dev-cluster/up.sh: source it to use the development cluster.\nexport MPQ_SLURM_STATE=%q\nexport SLURM_CONF=%q\n' \
  "$STATE" "$SLURM_CONF" >"$STATE/env.sh.tmp"
chmod 644 "$STATE/env.sh.tmp"
mv -f "$STATE/env.sh.tmp" "$STATE/env.sh"
runuser -u slurm -- test -r "$SLURM_CONF" ||
  die "the slurm user cannot read $SLURM_CONF: choose an MPQ_SLURM_STATE whose parents are world-traversable"

# ---------------------------------------------------------------- munged
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  install -d -o munge -g munge -m 700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
if running munged; then
  status_of munged
else
  remove_stale_pidfile "$MUNGE_PIDFILE" munged
  setsid runuser -u munge -- /usr/sbin/munged </dev/null >>"$LOGDIR/munged.out" 2>&1 9>&- ||
    { show_log /var/log/munge/munged.log; show_log "$LOGDIR/munged.out"; die "munged did not start"; }
  remember munged "$MUNGE_PIDFILE" || { show_log /var/log/munge/munged.log; die "munged did not start"; }
fi
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
wait_until "munge credentials" munge_ok || die "munge -n | unmunge fails: is munged healthy? see /var/log/munge/munged.log"

# ---------------------------------------------------------------- MariaDB
db_ping() { mariadb-admin --connect-timeout=2 ping; }
if db_ping >/dev/null 2>&1; then
  status_of mariadbd
elif running mariadbd; then
  log "mariadbd: running but not answering yet; waiting for it"
  wait_until "mariadbd to answer" db_ping || die "mariadbd runs but does not answer on its socket"
  status_of mariadbd
else
  remove_stale_pidfile "$MYSQL_PIDFILE" mariadbd
  install -d -o mysql -g root -m 755 /run/mysqld
  setsid /usr/sbin/mariadbd --user=mysql --skip-networking --log-error="$LOGDIR/mariadb.log" \
    --innodb-lock-wait-timeout=900 </dev/null >>"$LOGDIR/mariadb.out" 2>&1 9>&- &
  wait_until "mariadbd to answer" db_ping ||
    { show_log "$LOGDIR/mariadb.log"; die "mariadbd did not start"; }
  remember mariadbd "$MYSQL_PIDFILE" || { show_log "$LOGDIR/mariadb.log"; die "mariadbd did not start"; }
fi
mariadb --batch <<SQL || die "could not create the $DB_NAME database / slurm@localhost user in MariaDB"
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
CREATE DATABASE IF NOT EXISTS $DB_NAME;
GRANT ALL PRIVILEGES ON $DB_NAME.* TO 'slurm'@'localhost';
SQL

# start_daemon NAME: clear a stale pid file, start /usr/sbin/NAME in its own session, remember its pid
start_daemon() {
  local name="$1"
  remove_stale_pidfile "$RUNDIR/$name.pid" "$name"
  remove_stale_pidfile "/run/$name.pid" "$name"
  setsid "/usr/sbin/$name" </dev/null >>"$LOGDIR/$name.out" 2>&1 9>&- ||
    { show_log "$LOGDIR/$name.log"; die "$name did not start"; }
  remember "$name" "$RUNDIR/$name.pid" || { show_log "$LOGDIR/$name.log"; die "$name did not start"; }
}

# ---------------------------------------------------------------- slurmdbd
if running slurmdbd; then
  status_of slurmdbd
else
  start_daemon slurmdbd
fi
cluster_listed() { sacctmgr -nP show cluster format=cluster | grep -qx "$CLUSTER"; }
registered_now=0
if ! cluster_listed >/dev/null 2>&1; then
  wait_until "slurmdbd to answer sacctmgr" sacctmgr -n show cluster ||
    { show_log "$LOGDIR/slurmdbd.log"; die "slurmdbd does not answer"; }
  if ! cluster_listed; then
    log "registering cluster $CLUSTER in the accounting database"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    registered_now=1
  fi
fi

# ---------------------------------------------------------------- slurmctld
if running slurmctld && [ "$registered_now" -eq 1 ] && ours slurmctld >/dev/null; then
  log "slurmctld: restarting it so that it reports to the newly registered cluster"
  stop_ours slurmctld
fi
if running slurmctld; then
  status_of slurmctld
  [ "$registered_now" -eq 1 ] && ! ours slurmctld >/dev/null &&
    warn "cluster $CLUSTER was just registered; the running slurmctld (not ours) may need a restart"
else
  start_daemon slurmctld
fi

# ---------------------------------------------------------------- slurmd
if running slurmd; then
  status_of slurmd
else
  start_daemon slurmd
fi

# ---------------------------------------------------------------- ready?
resumed=0
node_ready() {
  local state
  state="$(sinfo -h -N -n "$NODE" -p "$PARTITION" -o '%t' 2>/dev/null | head -n1)"
  case "$state" in
    idle | mix | alloc | comp) return 0 ;;
    drain* | drng* | down | fail*)
      if [ "$resumed" -eq 0 ]; then
        resumed=1
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
      fi
      return 1
      ;;
    *) return 1 ;;
  esac
}
until node_ready; do
  if ((SECONDS >= DEADLINE)); then
    sinfo -N -n "$NODE" >&2 || true
    show_log "$LOGDIR/slurmctld.log"
    show_log "$LOGDIR/slurmd.log"
    die "node $NODE not idle after ${UP_TIMEOUT}s (MPQ_SLURM_TIMEOUT)"
  fi
  sleep 0.25
done
if [ "$registered_now" -eq 1 ]; then # else it was listed above already
  wait_until "sacctmgr to list cluster $CLUSTER" cluster_listed || die "cluster $CLUSTER missing from accounting"
fi

log "cluster $CLUSTER is up: node $NODE $(sinfo -h -N -n "$NODE" -o '%t'), partition $PARTITION, $CPUS CPUs, accounting on"
log "use it with: source $STATE/env.sh   (logs: $LOGDIR, munged: /var/log/munge/munged.log)"
