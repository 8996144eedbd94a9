#!/usr/bin/env bash
# A real SLURM cluster (Debian slurm-wlm + munge) on this one machine, for development and CI.
#
#   tools/local_slurm.sh start  [--nodes 1|2]   bring it up (idempotent), print `sinfo` when ready
#   tools/local_slurm.sh stop                   tear down exactly what `start` created (idempotent)
#   tools/local_slurm.sh status                 exit 0 and print `sinfo` if running, exit 3 if not
#   tools/local_slurm.sh env                    print `export SLURM_CONF=...` for `eval`
#
# Layout: one network namespace "<name>-ctl" holds a bridge and slurmctld; every node gets its own network
# namespace "<name>-nodeN" joined to the bridge by a veth pair, its own hostname (nodeN) and address, and its
# own slurmd. Namespaces rather than several slurmd on 127.0.0.1: each node has its own hostname and address,
# as on a real cluster, so the node list and the rendezvous address resolve as they do there. A veth from the
# host namespace into the bridge lets sbatch/sinfo/srun on the host reach the cluster. Namespaces are entered with
# `nsenter --net=... unshare --uts --mount`, never `ip netns exec` (that remounts /sys, hides the cgroup
# mount, and slurmd refuses to start). One munged on the host serves every namespace (unix socket).
# Nodes have no route to the outside world: jobs must not need the network (set HF_HUB_OFFLINE=1).
#
# Environment knobs:
#   NEUROPRUNE_SLURM_DIR      scratch dir for config, state, logs, PID files   [/tmp/neuroprune-slurm]
#   NEUROPRUNE_SLURM_NAME     prefix of namespace and interface names         [npslurm]
#   NEUROPRUNE_SLURM_SUBNET   first three octets of the private /24           [10.211.0]
#   NEUROPRUNE_SLURM_TIMEOUT  seconds to wait for nodes to reach idle         [60]
#   NEUROPRUNE_SLURM_ETC_LINK 1: symlink /etc/slurm/slurm.conf to ours when absent, so plain `sbatch`
#                             works in any shell (removed again by stop)       [1]
set -euo pipefail
# Daemons and ip live in sbin, which a CI shell's PATH may lack.
export PATH=$PATH:/usr/sbin:/sbin

DIR=${NEUROPRUNE_SLURM_DIR:-/tmp/neuroprune-slurm}
NAME=${NEUROPRUNE_SLURM_NAME:-npslurm}
SUBNET=${NEUROPRUNE_SLURM_SUBNET:-10.211.0}
TIMEOUT=${NEUROPRUNE_SLURM_TIMEOUT:-60}
ETC_LINK=${NEUROPRUNE_SLURM_ETC_LINK:-1}
CONF=$DIR/etc/slurm.conf
STATE=$DIR/state.env            # what start created; the only thing stop trusts
ETC_CONF=/etc/slurm/slurm.conf
CTL_NS=$NAME-ctl
CTL_ADDR=$SUBNET.1
HOST_ADDR=$SUBNET.254
HOST_VETH=${NAME:0:8}-h         # interface names are limited to 15 characters
MUNGE_SOCKET=/run/munge/munge.socket.2
MUNGE_PIDFILE=/run/munge/munged.pid

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

log() { printf '[local_slurm] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

node_ns() { echo "$NAME-node$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

# Run a command inside a namespace "box": its network namespace plus private UTS (hostname) and mount
# namespaces. The mount namespace lets us bind a private /etc/hosts (node names resolve inside the cluster,
# the host's /etc/hosts is untouched) and, if the machine lacks one, mount a private tmpfs at /sys/fs/cgroup
# (slurmd 22.05 refuses to start when nothing is mounted there, even with proctrack/linuxproc).
in_box() {
  local ns=$1 host=$2; shift 2
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
    /bin/bash -c '
      set -euo pipefail
      hostname "$1"
      mount --bind "$2" /etc/hosts
      if ! mountpoint -q /sys/fs/cgroup; then
        echo "[local_slurm] nothing mounted at /sys/fs/cgroup: mounting a private tmpfs for slurmd" >&2
        mount -t tmpfs -o mode=0755 "'"$NAME"'-cgroup" /sys/fs/cgroup
        # ...and the named v1 hierarchy slurmd checks before it starts (cgroup/v1 is autodetected on tmpfs).
        mkdir /sys/fs/cgroup/systemd
        mount -t cgroup -o none,name=systemd "'"$NAME"'-cgroup" /sys/fs/cgroup/systemd
      fi
      shift 2
      exec "$@"' box "$host" "$DIR/etc/hosts" "$@" 9>&-   # daemons must not inherit the lock fd
}

# The PID in FILE is alive and runs program COMM (guards against recycled PIDs).
pid_alive() {
  local file=$1 comm=$2 pid
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/comm && $(</proc/$pid/comm) == "$comm" ]] || return 1
  # A zombie has exited already; PID 1 here may reap it late.
  [[ $(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) != Z ]]
}

# Kill the process recorded in FILE if it still runs COMM; wait up to 10 s, then SIGKILL.
kill_pidfile() {
  local file=$1 comm=$2 pid i
  pid_alive "$file" "$comm" || { rm -f "$file"; return 0; }
  pid=$(<"$file")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    pid_alive "$file" "$comm" || break
    sleep 0.1
  done
  if pid_alive "$file" "$comm"; then
    log "$comm ($pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# Every process whose network namespace is NS (job steps left behind by slurmd, for instance). They were
# all started by our daemons: nothing else can enter a namespace we created.
pids_in_ns() {
  local ns=$1 ino p
  [[ -e /run/netns/$ns ]] || return 0
  ino=$(stat -L -c %i "/run/netns/$ns")
  for p in /proc/[0-9]*; do
    [[ $(stat -L -c %i "$p/ns/net" 2>/dev/null) == "$ino" ]] && echo "${p#/proc/}"
  done
  return 0
}

record() { echo "$1=$2" >>"$STATE"; }

# --------------------------------------------------------------------------------------------- install --
ensure_packages() {
  local missing=()
  # Absolute paths: /usr/sbin is not on every PATH.
  [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/bin/sbatch ]] || missing+=(slurm-wlm)
  [[ -x /usr/sbin/munged ]] || missing+=(munge)
  [[ -x /usr/bin/nsenter && -x /usr/bin/unshare ]] || missing+=(util-linux)
  [[ -x /usr/sbin/ip || -x /usr/bin/ip || -x /sbin/ip ]] || missing+=(iproute2)
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root so apt-get can install them"
  log "installing ${missing[*]} with apt-get"
  # Debian's packages try to start services; policy-rc.d blocks that here, and we start daemons by hand.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
        >"$DIR/apt.log" 2>&1; then
    log "apt-get install failed; retrying after apt-get update"
    apt-get update >>"$DIR/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
      >>"$DIR/apt.log" 2>&1 || { tail -n 20 "$DIR/apt.log" >&2; die "apt-get install failed"; }
  fi
}

# ------------------------------------------------------------------------------------------------ munge --
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munge() {
  if munge_ok; then
    log "munged already running: reusing it (stop will leave it alone)"
    return 0
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 0700 /etc/munge
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    record CREATED_MUNGE_KEY 1
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  # --force: start even if a stale socket from an earlier crash is lying around.
  runuser -u munge -- /usr/sbin/munged --force --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_PIDFILE" 9>&-
  record STARTED_MUNGED 1
  local i
  for i in $(seq 50); do munge_ok && return 0; sleep 0.1; done
  tail -n 20 /var/log/munge/munged.log >&2 || true
  die "munged did not come up"
}

# -------------------------------------------------------------------------------------------- network --
check_subnet_free() {
  if ip -o -4 addr show | grep -q " $SUBNET\."; then
    die "$SUBNET.0/24 is already in use on this machine; set NEUROPRUNE_SLURM_SUBNET to a free range"
  fi
  [[ ! -e /run/netns/$CTL_NS ]] || die "network namespace $CTL_NS exists but is not ours (no state file); \
remove it with 'ip netns del $CTL_NS' or set NEUROPRUNE_SLURM_NAME"
}

# Create namespace NS and record it before anything else can fail, so that stop removes it.
add_ns() {
  ip netns add "$1"
  record NETNS "$1"
  ip -n "$1" link set lo up
}

# A veth pair: one end named END_A moved into NS_A (or left on the host when NS_A is "-"), the other end
# END_B enslaved to the bridge in the controller namespace.
add_link_to_bridge() {
  local ns_a=$1 end_a=$2 end_b=$3 addr=$4
  ip link add "$end_a" type veth peer name "$end_b"
  record LINK "$end_a"
  ip link set "$end_b" netns "$CTL_NS"
  ip -n "$CTL_NS" link set "$end_b" master br0 up
  if [[ $ns_a == - ]]; then
    ip addr add "$addr/24" dev "$end_a"
    ip link set "$end_a" up
  else
    ip link set "$end_a" netns "$ns_a"
    ip -n "$ns_a" addr add "$addr/24" dev "$end_a"
    ip -n "$ns_a" link set "$end_a" up
  fi
}

setup_network() {
  local nodes=$1 i
  check_subnet_free
  add_ns "$CTL_NS"
  ip -n "$CTL_NS" link add br0 type bridge
  ip -n "$CTL_NS" addr add "$CTL_ADDR/24" dev br0
  ip -n "$CTL_NS" link set br0 up
  add_link_to_bridge - "$HOST_VETH" "${NAME:0:8}-hb" "$HOST_ADDR"
  for i in $(seq "$nodes"); do
    add_ns "$(node_ns "$i")"
    add_link_to_bridge "$(node_ns "$i")" "${NAME:0:8}-n$i" "${NAME:0:8}-n${i}b" "$(node_addr "$i")"
  done
  # Node names resolve inside the cluster through a private /etc/hosts bound in each namespace.
  {
    grep -v -E '(^|\s)(ctl|node[0-9]+)(\s|$)' /etc/hosts || true
    echo "$CTL_ADDR ctl"
    for i in $(seq "$nodes"); do echo "$(node_addr "$i") node$i"; done
  } >"$DIR/etc/hosts"
}

# -------------------------------------------------------------------------------------------- config --
write_conf() {
  local nodes=$1 hw
  # Describe each node as the hardware slurmd sees (CPUs, sockets, memory) so it is not drained for a
  # mismatch; every node shares this machine, so each one gets all of it.
  hw=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')
  cat >"$CONF" <<EOF
# Generated by tools/local_slurm.sh; removed by 'tools/local_slurm.sh stop'.
ClusterName=neuroprune
SlurmctldHost=ctl($CTL_ADDR)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Credentials also gate requeue: a requeued job waits cred_expire+1 s before it may start (default 120).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Scan pending jobs often (default 60 s) so requeued jobs restart promptly.
SchedulerParameters=sched_interval=2,bf_interval=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# With the default 300 s, 'sbatch --wait' backs off to 10, 42 ... s between polls; with <= 5 it polls
# every 2 s (measured).
MinJobAge=5
KillWait=5
InactiveLimit=0
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
  local i
  for i in $(seq "$nodes"); do
    echo "NodeName=node$i NodeAddr=$(node_addr "$i") $hw State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
  if [[ $ETC_LINK == 1 && ! -e $ETC_CONF && ! -L $ETC_CONF ]]; then
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$CONF" "$ETC_CONF"
    record ETC_LINK "$ETC_CONF"
  fi
}

# ------------------------------------------------------------------------------------------- daemons --
start_daemons() {
  local nodes=$1 i
  # Both daemons fork into the background once initialised; a non-zero status means they gave up.
  in_box "$CTL_NS" ctl /usr/sbin/slurmctld -f "$CONF" -i || { dump_logs; die "slurmctld failed to start"; }
  for i in $(seq "$nodes"); do
    mkdir -p "$DIR/spool/node$i"   # slurmd would complain before creating it itself
    in_box "$(node_ns "$i")" "node$i" /usr/sbin/slurmd -f "$CONF" || { dump_logs; die "slurmd on node$i failed to start"; }
  done
}

dump_logs() {
  local f
  for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd-*.log; do
    [[ -e $f ]] || continue
    echo "----- tail of $f" >&2
    tail -n 25 "$f" >&2
  done
}

wait_idle() {
  local nodes=$1 deadline states
  deadline=$((SECONDS + TIMEOUT))
  while ((SECONDS < deadline)); do
    states=$(SLURM_CONF=$CONF sinfo -h -N -p debug -o '%T' 2>/dev/null | sort | uniq -c | xargs || true)
    [[ $states == "$nodes idle" ]] && return 0
    sleep 0.3
  done
  log "nodes did not reach idle within ${TIMEOUT}s (last sinfo states: '${states:-none}')"
  SLURM_CONF=$CONF sinfo -N -l >&2 || true
  dump_logs
  die "cluster did not come up; run 'tools/local_slurm.sh stop' to clean up"
}

# ----------------------------------------------------------------------------------------- commands --
is_running() {
  [[ -s $STATE ]] || return 1
  pid_alive "$DIR/run/slurmctld.pid" slurmctld || return 1
  local n i
  n=$(sed -n 's/^NODES=//p' "$STATE")
  [[ -n $n ]] || return 1
  for i in $(seq "$n"); do pid_alive "$DIR/run/slurmd-node$i.pid" slurmd || return 1; done
}

cmd_start() {
  local nodes=$1 t0=$SECONDS
  if is_running; then
    local have
    have=$(sed -n 's/^NODES=//p' "$STATE")
    [[ $have == "$nodes" ]] || die "a $have-node cluster is already running; run 'stop' first"
    log "already running ($have node(s))"
    SLURM_CONF=$CONF sinfo
    return 0
  fi
  if [[ -e $STATE ]]; then
    log "found a partial or dead cluster in $DIR: cleaning it up first"
    cmd_stop
  fi
  [[ $(id -u) == 0 ]] || die "must run as root (network namespaces, daemons as SlurmUser=root)"
  mkdir -p "$DIR"/{etc,log,run,state,spool}
  # Logs outlive stop (for a failed CI run); a new cluster starts them afresh.
  rm -f "$DIR"/log/*.log
  : >"$STATE"
  record NODES "$nodes"
  ensure_packages
  ensure_munge
  setup_network "$nodes"
  write_conf "$nodes"
  start_daemons "$nodes"
  wait_idle "$nodes"
  log "up in $((SECONDS - t0)) s; clients use SLURM_CONF=$CONF"
  SLURM_CONF=$CONF sinfo
}

cmd_stop() {
  if [[ ! -e $STATE ]]; then
    log "not running (no $STATE)"
    return 0
  fi
  local f ns pid link
  # Daemons first (slurmd before slurmctld so nothing tries to reschedule), then anything their jobs left.
  for f in "$DIR"/run/slurmd-*.pid; do [[ -e $f ]] && kill_pidfile "$f" slurmd; done
  kill_pidfile "$DIR/run/slurmctld.pid" slurmctld
  while read -r ns; do
    for pid in $(pids_in_ns "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
  done < <(sed -n 's/^NETNS=//p' "$STATE")
  if grep -q '^STARTED_MUNGED=1' "$STATE"; then
    # Only if we started it: another munged may serve other users of this machine.
    kill_pidfile "$MUNGE_PIDFILE" munged
  fi
  while read -r link; do
    ip link show "$link" >/dev/null 2>&1 && ip link del "$link" 2>/dev/null || true
  done < <(sed -n 's/^LINK=//p' "$STATE")
  # Deleting a namespace also deletes the veth ends inside it.
  while read -r ns; do
    [[ -e /run/netns/$ns ]] && ip netns del "$ns"
  done < <(sed -n 's/^NETNS=//p' "$STATE")
  if grep -q "^ETC_LINK=$ETC_CONF\$" "$STATE" && [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then
    rm -f "$ETC_CONF"
  fi
  # Keep the logs (useful after a failed CI run); drop state so a new start is clean.
  rm -rf "$DIR"/{state,spool,run,etc}
  rm -f "$STATE"
  log "stopped"
}

cmd_status() {
  if is_running; then
    log "running ($(sed -n 's/^NODES=//p' "$STATE") node(s)); SLURM_CONF=$CONF"
    SLURM_CONF=$CONF sinfo
    return 0
  fi
  log "not running"
  return 3
}

main() {
  (($# >= 1)) || usage
  local cmd=$1 nodes=1
  shift
  while (($#)); do
    case $1 in
      --nodes) (($# >= 2)) || usage; nodes=$2; shift 2 ;;
      --nodes=*) nodes=${1#*=}; shift ;;
      -h|--help) usage ;;
      *) log "unknown argument: $1"; usage ;;
    esac
  done
  [[ $nodes == 1 || $nodes == 2 ]] || die "--nodes must be 1 or 2 (got '$nodes')"
  case $cmd in
    start|stop|status) ;;
    env) echo "export SLURM_CONF=$CONF"; return 0 ;;
    -h|--help|help) usage ;;
    *) log "unknown command: $cmd"; usage ;;
  esac
  mkdir -p "$DIR"
  # Serialise concurrent start/stop calls (parallel test sessions on one machine).
  exec 9>"$DIR/.lock"
  flock -w 120 9 || die "another local_slurm.sh holds $DIR/.lock"
  "cmd_$cmd" "$nodes"
}

main "$@"
