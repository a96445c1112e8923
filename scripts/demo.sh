#!/usr/bin/env bash
# The main job: a local 3-node Tandem cluster on this one machine.
#   ./tandem demo [start]   build, then start (or show, if already running)
#   ./tandem demo status    tandemadm / tandem-lockctl status of every node
#   ./tandem demo stop      stop everything this demo started and remove its namespaces
# Each node runs in its own network namespace (10.213.200.N on a private bridge) with a
# file-backed disk under $TANDEM_DEMO_DIR (default /var/lib/tandem-demo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
action="${1:-start}"
demo="${TANDEM_DEMO_DIR:-/var/lib/tandem-demo}"
nodes=(n1 n2 n3)
bin="$repo/target/release"
cfg="$demo/cluster.toml"
hub="tdemo-hub"

need_root() {
  if [ "$(id -u)" -ne 0 ]; then echo "demo: run as root (it creates network namespaces and mounts)" >&2; exit 1; fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

adm() { "$bin/tandemadm" --config "$cfg" --node "$@"; }

write_config() {
  mkdir -p "$demo"/{disks,state,run,logs,pids,mnt}
  cat > "$cfg" <<EOF
[cluster]
name = "demo"
secret = "tandem-demo-secret"
state-dir = "$demo/state"
run-dir = "$demo/run"
EOF
  local i=1
  for n in "${nodes[@]}"; do
    printf '\n[[node]]\nname = "%s"\nid = %d\naddress = "10.213.200.%d"\n' "$n" "$i" "$i" >> "$cfg"
    i=$((i + 1))
  done
  printf '\n[[resource]]\nname = "www"\nprotocol = "C"\nallow-two-primaries = true\nsize = "256MiB"\n' >> "$cfg"
  for n in "${nodes[@]}"; do
    printf '[resource.on.%s]\ndisk = "%s/disks/%s.img"\n' "$n" "$demo" "$n" >> "$cfg"
  done
}

make_net() {
  ip netns list | grep -qw "$hub" && return 0
  ip netns add "$hub"
  ip -n "$hub" link set lo up
  ip -n "$hub" link add br0 type bridge
  ip -n "$hub" link set br0 up
  local i=1
  for n in "${nodes[@]}"; do
    ip netns add "tdemo-$n"
    ip link add "tdemo${i}a" type veth peer name "tdemo${i}b"
    ip link set "tdemo${i}a" netns "tdemo-$n"
    ip link set "tdemo${i}b" netns "$hub"
    ip -n "tdemo-$n" link set "tdemo${i}a" name eth0
    ip -n "tdemo-$n" addr add "10.213.200.$i/24" dev eth0
    ip -n "tdemo-$n" link set eth0 up
    ip -n "tdemo-$n" link set lo up
    ip -n "$hub" link set "tdemo${i}b" master br0
    ip -n "$hub" link set "tdemo${i}b" up
    i=$((i + 1))
  done
}

start_daemon() { # node name pidfile cmd...
  local n="$1" what="$2"; shift 2
  local pidf="$demo/pids/$n-$what.pid"
  alive "$pidf" && return 0
  nohup ip netns exec "tdemo-$n" "$@" >> "$demo/logs/$n-$what.log" 2>&1 &
  echo $! > "$pidf"
}

wait_until() { # seconds command...
  local t="$1"; shift
  for _ in $(seq 1 $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  "$@"
}

start() {
  need_root
  ./scripts/install-deps.sh
  echo "demo: building release binaries (first time takes a few minutes) ..."
  cargo build --release --workspace --bins --quiet
  write_config
  make_net
  local fresh=0
  for n in "${nodes[@]}"; do
    if ! adm "$n" dump-md www >/dev/null 2>&1; then
      adm "$n" create-md www >/dev/null
      fresh=1
    fi
    start_daemon "$n" replicatord "$bin/tandem-replicatord" --config "$cfg" --node "$n" --up www
  done
  for n in "${nodes[@]}"; do wait_until 10 adm "$n" status www; done
  if [ "$fresh" = 1 ]; then
    wait_until 20 bash -c "[ \"\$('$bin/tandemadm' --config '$cfg' --node n1 status www --json | grep -c '\"Connected\"')\" = 2 ]"
    adm n1 new-current-uuid --clear-bitmap www
  fi
  for n in "${nodes[@]}"; do adm "$n" wait-sync www --timeout-s 60 >/dev/null; done
  # Dual-primary: every node writes the volume (allow-two-primaries in the config).
  for n in "${nodes[@]}"; do adm "$n" primary www >/dev/null; done
  for n in "${nodes[@]}"; do
    start_daemon "$n" lockd "$bin/tandem-lockd" --config "$cfg" --node "$n"
  done
  wait_until 30 bash -c "'$bin/tandem-lockctl' --config '$cfg' --node n1 status --json | grep -q '\"leader\": *[1-9]'"
  local mounted=""
  local uri="nbd+unix:///www?socket=$demo/run/n1/nbd-www.sock"
  if ! "$bin/tandemfs" fsck -n "$uri" >/dev/null 2>&1; then
    "$bin/tandemfs" mkfs -q -t demo:www -j 3 -p lock_tandem "$uri"
  fi
  # Each node mounts the cluster filesystem from its own replica, through its own lockd.
  for n in "${nodes[@]}"; do
    mkdir -p "$demo/mnt/$n"
    if ! mountpoint -q "$demo/mnt/$n"; then
      "$bin/tandemfs" mount "nbd+unix:///www?socket=$demo/run/$n/nbd-www.sock" "$demo/mnt/$n" \
        -o "node=$n,config=$cfg,allow_other,logfile=$demo/logs/$n-fs.log"
    fi
  done
  mounted="$demo/mnt/n1"
  cat <<EOF

Tandem demo cluster is up: 3 nodes (n1 n2 n3) in network namespaces tdemo-n1..3,
replicated volume "www" (256 MiB, protocol C) on file-backed disks in $demo/disks.

  inspect:   $bin/tandemadm --config $cfg --node n1 status
             $bin/tandemadm --config $cfg --node n2 events --now
EOF
  if [ -x "$bin/tandem-lockd" ]; then
    echo "             $bin/tandem-lockctl --config $cfg --node n1 status"
  fi
  if [ -n "$mounted" ]; then
    cat <<EOF
  use:       echo hello > $demo/mnt/n1/index.html; cat $demo/mnt/n2/index.html
             one cluster filesystem mounted on every node ($demo/mnt/n1..n3), each from
             its own replica of the dual-primary volume, kept coherent by tandem-lockd;
             glock statistics: cat $demo/run/n1/tandemfs-*.glstats
EOF
  fi
  cat <<EOF
  NBD:       nbdinfo 'nbd+unix:///www?socket=$demo/run/n2/nbd-www.sock'
  stop:      ./tandem demo stop
EOF
}

status() {
  for n in "${nodes[@]}"; do
    echo "== $n"
    adm "$n" status || true
    [ -x "$bin/tandem-lockctl" ] && "$bin/tandem-lockctl" --config "$cfg" --node "$n" status 2>/dev/null || true
  done
}

stop() {
  need_root
  for m in "$demo"/mnt/*; do
    [ -d "$m" ] && mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m"; }
  done
  # The mount daemons give their locks back to lockd as they exit: let them finish.
  for _ in $(seq 1 50); do pgrep -f "tandemfs mount .*$demo/mnt" >/dev/null || break; sleep 0.1; done
  for f in "$demo"/pids/*.pid; do
    [ -f "$f" ] || continue
    if alive "$f"; then kill "$(cat "$f")" 2>/dev/null || true; fi
  done
  sleep 1
  for f in "$demo"/pids/*.pid; do
    [ -f "$f" ] || continue
    if alive "$f"; then kill -9 "$(cat "$f")" 2>/dev/null || true; fi
    rm -f "$f"
  done
  for n in "${nodes[@]}"; do ip netns del "tdemo-$n" 2>/dev/null || true; done
  ip netns del "$hub" 2>/dev/null || true
  echo "demo: stopped (data kept in $demo; remove it with rm -rf $demo)"
}

case "$action" in
  start) start ;;
  status) status ;;
  stop) stop ;;
  *) echo "demo: unknown action '$action' (start|status|stop)" >&2; exit 2 ;;
esac
