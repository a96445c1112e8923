#!/usr/bin/env bash
# The main job: a local 3-node Tandem cluster on this one machine.
#   ./tandem demo [start] [--web]  build, then start (or show, if already running); --web
#                                  also starts nginx on every node and HAProxy in front
#   ./tandem demo web              the same as: start --web
#   ./tandem demo status           tandemadm / tandem-lockctl status of every node
#   ./tandem demo kill-node NODE   SIGKILL every process of NODE (a crash: try failover)
#   ./tandem demo restart-node NODE  start NODE's processes again (resync, mount, nginx)
#   ./tandem demo stop             stop everything this demo started, remove its namespaces
# Each node runs in its own network namespace (10.213.200.N on a private bridge) with a
# file-backed disk under $TANDEM_DEMO_DIR (default /var/lib/tandem-demo).
# Other settings (for tests and benchmarks that run their own copy beside a user's demo):
# TANDEM_DEMO_NS (namespace prefix, default tdemo), TANDEM_DEMO_NET (first three octets,
# default 10.213.200), TANDEM_DEMO_NODES (default 3), TANDEM_DEMO_SIZE (default 256MiB),
# TANDEM_DEMO_DISKLESS (default 0: the last K nodes are diskless tiebreakers: replicator
# quorum vote and lock-manager witness, no disk, no mount, no nginx),
# TANDEM_BIN_DIR (use these binaries instead of building target/release),
# TANDEM_DEMO_MOUNT_OPTS (extra mount.tandem -o options, e.g. threads=1) and
# TANDEM_DEMO_NGINX_WORKERS (nginx worker_processes, default 1) for benchmark experiments.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
action=start
web=0
node_arg=""
for a in "$@"; do
  case "$a" in
    --web) web=1 ;;
    web) action=start; web=1 ;;
    start | status | stop | kill-node | restart-node) action="$a" ;;
    -h | --help | help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    n[0-9]) node_arg="$a" ;;
    *) echo "demo: unknown argument '$a' (start [--web] | web | status | kill-node NODE | restart-node NODE | stop)" >&2; exit 2 ;;
  esac
done
demo="${TANDEM_DEMO_DIR:-/var/lib/tandem-demo}"
ns="${TANDEM_DEMO_NS:-tdemo}"
net="${TANDEM_DEMO_NET:-10.213.200}"
size="${TANDEM_DEMO_SIZE:-256MiB}"
nodes=()
for i in $(seq 1 "${TANDEM_DEMO_NODES:-3}"); do nodes+=("n$i"); done
# The last TANDEM_DEMO_DISKLESS nodes hold no disk: quorum tiebreakers and lockd witnesses.
tb_count="${TANDEM_DEMO_DISKLESS:-0}"
if ! [ "$tb_count" -ge 0 ] 2>/dev/null || [ "$tb_count" -ge "${#nodes[@]}" ]; then
  echo "demo: TANDEM_DEMO_DISKLESS must be 0..$((${#nodes[@]} - 1)), not '$tb_count'" >&2; exit 2
fi
disk_nodes=("${nodes[@]:0:${#nodes[@]}-tb_count}")
tb_nodes=("${nodes[@]:${#nodes[@]}-tb_count}")
is_tb() { [[ " ${tb_nodes[*]} " == *" $1 "* ]]; }
if [ -n "${TANDEM_BIN_DIR:-}" ]; then bin="$TANDEM_BIN_DIR"; build=0; else bin="$repo/target/release"; build=1; fi
cfg="$demo/cluster.toml"
hub="$ns-hub"
hubip="$net.254"
if [ ${#ns} -gt 10 ]; then echo "demo: TANDEM_DEMO_NS '$ns' is too long (10 characters at most)" >&2; exit 2; fi

need_root() {
  if [ "$(id -u)" -ne 0 ]; then echo "demo: run as root (it creates network namespaces and mounts)" >&2; exit 1; fi
}

# The process of a PID file is running (a zombie, not yet reaped by init, is not).
alive() {
  local p
  [ -f "$1" ] && p=$(cat "$1") && [ -n "$p" ] && [ -d "/proc/$p" ] &&
    ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null
}

adm() { "$bin/tandemadm" --config "$cfg" --node "$@"; }

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

node_index() { # n3 -> 3, or an error naming the nodes
  local n="$1" i=1
  for m in "${nodes[@]}"; do
    [ "$m" = "$n" ] && { echo "$i"; return 0; }
    i=$((i + 1))
  done
  echo "demo: no node '$n' (nodes: ${nodes[*]})" >&2
  return 1
}

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
    printf '\n[[node]]\nname = "%s"\nid = %d\naddress = "%s.%d"\n' "$n" "$i" "$net" "$i" >> "$cfg"
    if is_tb "$n"; then printf 'witness = true\n' >> "$cfg"; fi
    i=$((i + 1))
  done
  printf '\n[[resource]]\nname = "www"\nprotocol = "C"\nallow-two-primaries = true\nsize = "%s"\n' "$size" >> "$cfg"
  if [ "$tb_count" -gt 0 ]; then
    printf 'nodes = [%s]\n' "$(printf '"%s", ' "${nodes[@]}" | sed 's/, $//')" >> "$cfg"
  fi
  # From three nodes on, a node cut off from the majority fails its writes instead of
  # writing a split brain under the cluster filesystem (DRBD's quorum majority).
  if [ "${#nodes[@]}" -ge 3 ]; then
    printf 'quorum = "majority"\non-no-quorum = "io-error"\n' >> "$cfg"
  fi
  for n in "${disk_nodes[@]}"; do
    printf '[resource.on.%s]\ndisk = "%s/disks/%s.img"\n' "$n" "$demo" "$n" >> "$cfg"
  done
}

make_net() {
  if ! ip netns list | grep -qw "$hub"; then
    ip netns add "$hub"
    ip -n "$hub" link set lo up
    ip -n "$hub" link add br0 type bridge
    ip -n "$hub" link set br0 up
  fi
  local i=1
  for n in "${nodes[@]}"; do
    if ! ip netns list | grep -qw "$ns-$n"; then
      ip netns add "$ns-$n"
      ip link add "${ns}${i}a" type veth peer name "${ns}${i}b"
      ip link set "${ns}${i}a" netns "$ns-$n"
      ip link set "${ns}${i}b" netns "$hub"
      ip -n "$ns-$n" link set "${ns}${i}a" name eth0
      ip -n "$ns-$n" addr add "$net.$i/24" dev eth0
      ip -n "$ns-$n" link set eth0 up
      ip -n "$ns-$n" link set lo up
      ip -n "$hub" link set "${ns}${i}b" master br0
      ip -n "$hub" link set "${ns}${i}b" up
    fi
    i=$((i + 1))
  done
}

start_daemon() { # node name cmd...   (in the node's network namespace)
  local n="$1" what="$2"; shift 2
  local pidf="$demo/pids/$n-$what.pid"
  alive "$pidf" && return 0
  nohup ip netns exec "$ns-$n" "$@" >> "$demo/logs/$n-$what.log" 2>&1 &
  echo $! > "$pidf"
}

wait_until() { # seconds command...
  local t="$1"; shift
  for _ in $(seq 1 $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  "$@"
}

has_leader() { "$bin/tandem-lockctl" --config "$cfg" --node "$1" status --json | grep -q '"leader": *[1-9]'; }

# The replicated volume on one node: daemon up, in sync, Primary (dual-primary).
volume_up() { # node
  local n="$1"
  start_daemon "$n" replicatord "$bin/tandem-replicatord" --config "$cfg" --node "$n" --up www
  wait_until 10 adm "$n" status www >/dev/null || {
    echo "demo: tandem-replicatord of $n does not answer; see $demo/logs/$n-replicatord.log" >&2; return 1; }
}

volume_primary() { # node
  local n="$1"
  adm "$n" wait-sync www --timeout-s 120 >/dev/null || {
    echo "demo: $n's volume is not UpToDate after 120 s ($bin/tandemadm --config $cfg --node $n status)" >&2; return 1; }
  adm "$n" primary www >/dev/null
}

# Whether DIR is a mount point, from the mount table: stat(2), as mountpoint(1) does, would
# hang on a FUSE mount whose daemon is stuck.
is_mounted() { awk -v d="$1" '$5 == d { found = 1 } END { exit !found }' /proc/self/mountinfo; }

# A mount whose daemon is gone answers ENOTCONN: detach it so the directory can be mounted
# again. (Its PID file tells whether the daemon lives, without touching the mount.)
drop_dead_mount() { # node
  local m="$demo/mnt/$1"
  if is_mounted "$m" && ! alive "$demo/pids/$1-fs.pid"; then umount -l "$m" 2>/dev/null || true; fi
}

# Each node mounts the cluster filesystem from its own replica, through its own lockd.
# The mount daemon runs in the foreground under a PID file (not in the node's network
# namespace: `ip netns exec` would give it a private mount namespace).
mount_node() { # node
  local n="$1" m="$demo/mnt/$1" pidf="$demo/pids/$1-fs.pid"
  drop_dead_mount "$n"
  if is_mounted "$m"; then return 0; fi
  mkdir -p "$m"
  nohup "$bin/tandemfs" mount "nbd+unix:///www?socket=$demo/run/$n/nbd-www.sock" "$m" -f \
    -o "node=$n,config=$cfg,allow_other${TANDEM_DEMO_MOUNT_OPTS:+,$TANDEM_DEMO_MOUNT_OPTS}" >> "$demo/logs/$n-fs.log" 2>&1 &
  echo $! > "$pidf"
  for _ in $(seq 1 300); do
    is_mounted "$m" && return 0
    alive "$pidf" || break
    sleep 0.1
  done
  echo "demo: the mount of $n at $m did not appear; last lines of $demo/logs/$n-fs.log:" >&2
  tail -5 "$demo/logs/$n-fs.log" >&2
  return 1
}

# ---------------------------------------------------------------- web --
# nginx in every node's namespace (root = that node's mount), HAProxy in front (round
# robin, health checks, retries, redispatch) in the hub namespace, on the hub's own
# address $net.254 on the nodes' bridge: nothing of it is reachable from outside, and
# it reaches nothing outside (the hub has no route out).
nginx_conf() { # node index
  local n="$1" i="$2" w="$demo/web/$1"
  mkdir -p "$w"
  local common="add_header X-Served-By $n always;
        location = /whoami { default_type text/plain; return 200 \"$n\\n\"; }"
  {
    cat <<EOF
# nginx of demo node $n (written by scripts/demo.sh)
worker_processes ${TANDEM_DEMO_NGINX_WORKERS:-1};
daemon off;
pid $w/nginx.pid;
error_log $demo/logs/$n-nginx-error.log;
events { worker_connections 512; }
http {
    access_log off;
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    client_body_temp_path $w/body;
    proxy_temp_path $w/proxy;
    fastcgi_temp_path $w/fastcgi;
    uwsgi_temp_path $w/uwsgi;
    scgi_temp_path $w/scgi;
    server {
        listen $net.$i:80;
        root $demo/mnt/$n;
        set \$tandem_node $n;
        ssi on;
        $common
    }
EOF
    if [ -n "${TANDEM_DEMO_WEB_BASELINE:-}" ]; then
      # Benchmarks only: the same server on port 81 with another root (ext4).
      cat <<EOF
    server {
        listen $net.$i:81;
        root $TANDEM_DEMO_WEB_BASELINE;
        $common
    }
EOF
    fi
    echo "}"
  } > "$demo/web/$n.conf"
}

haproxy_conf() {
  local i=1
  {
    cat <<EOF
# HAProxy in front of the demo's nginx (written by scripts/demo.sh)
global
    maxconn 2048
    nbthread 1
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 2s
    retries 3
    option redispatch
    retry-on conn-failure empty-response junk-response 502 503 504
frontend www
    bind $hubip:80
    stats enable
    stats uri /haproxy-stats
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk
    http-check send meth GET uri /whoami
    http-check expect status 200
    default-server check inter 1s fall 2 rise 2
EOF
    for n in "${disk_nodes[@]}"; do echo "    server $n $net.$i:80"; i=$((i + 1)); done
    if [ -n "${TANDEM_DEMO_WEB_BASELINE:-}" ]; then
      printf 'frontend baseline\n    bind %s:81\n    default_backend baseline\n' "$hubip"
      printf 'backend baseline\n    balance roundrobin\n    option httpchk\n    http-check send meth GET uri /whoami\n'
      printf '    default-server check inter 1s fall 2 rise 2\n'
      i=1
      for n in "${disk_nodes[@]}"; do echo "    server $n $net.$i:81"; i=$((i + 1)); done
    fi
  } > "$demo/web/haproxy.cfg"
}

start_nginx() { # node
  local n="$1" i
  i=$(node_index "$n")
  nginx_conf "$n" "$i"
  if ! alive "$demo/pids/$n-nginx.pid"; then
    ip netns exec "$ns-$n" nginx -t -q -c "$demo/web/$n.conf" -e "$demo/logs/$n-nginx-error.log" || {
      echo "demo: nginx rejects $demo/web/$n.conf (above)" >&2; return 1; }
  fi
  start_daemon "$n" nginx nginx -c "$demo/web/$n.conf" -e "$demo/logs/$n-nginx-error.log"
  wait_until 10 ip netns exec "$hub" curl -sf -m 2 -o /dev/null "http://$net.$i/whoami" >/dev/null || {
    echo "demo: nginx of $n does not answer on $net.$i:80; see $demo/logs/$n-nginx*.log" >&2; return 1; }
}

start_web() {
  local c
  for c in nginx haproxy curl; do
    command -v "$c" >/dev/null || {
      echo "demo: $c is needed for --web: ./scripts/install-deps.sh nginx-light curl" >&2; return 1; }
  done
  mkdir -p "$demo/web"
  ip -n "$hub" addr add "$hubip/24" dev br0 2>/dev/null || true
  touch "$demo/web.enabled"
  for n in "${disk_nodes[@]}"; do start_nginx "$n"; done
  local first="${nodes[0]}"
  if [ ! -f "$demo/mnt/$first/index.html" ] || ! grep -q tandem_node "$demo/mnt/$first/index.html"; then
    cat > "$demo/mnt/$first/index.html" <<'EOF'
<!DOCTYPE html>
<html><head><title>Tandem demo</title></head>
<body>
<h1>Hello from a Tandem cluster</h1>
<p>This page is one file in the cluster filesystem, written once through one node's mount.
Every node's nginx serves it from its own mount of the shared, replicated volume.</p>
<p>Served by node <b><!--# echo var="tandem_node" --></b>.</p>
</body></html>
EOF
  fi
  haproxy_conf
  if ! alive "$demo/pids/haproxy.pid"; then
    ip netns exec "$hub" haproxy -c -q -f "$demo/web/haproxy.cfg" || {
      echo "demo: haproxy rejects $demo/web/haproxy.cfg (above)" >&2; return 1; }
    nohup ip netns exec "$hub" haproxy -db -f "$demo/web/haproxy.cfg" >> "$demo/logs/haproxy.log" 2>&1 &
    echo $! > "$demo/pids/haproxy.pid"
  fi
  wait_until 10 ip netns exec "$hub" curl -sf -m 2 -o /dev/null "http://$hubip/whoami" >/dev/null || {
    echo "demo: HAProxy does not answer on $hubip:80 (namespace $hub); see $demo/logs/haproxy.log" >&2; return 1; }
}

# ---------------------------------------------------------------- actions --
start() {
  need_root
  if [ "$web" = 1 ]; then ./scripts/install-deps.sh nginx-light curl; else ./scripts/install-deps.sh; fi
  if [ "$build" = 1 ]; then
    echo "demo: building release binaries (first time takes a few minutes) ..."
    cargo build --release --workspace --bins --quiet
  fi
  write_config
  make_net
  local fresh=0
  for n in "${disk_nodes[@]}"; do
    if ! adm "$n" dump-md www >/dev/null 2>&1; then
      adm "$n" create-md www >/dev/null
      fresh=1
    fi
  done
  for n in "${nodes[@]}"; do volume_up "$n"; done
  if [ "$fresh" = 1 ]; then
    wait_until 20 bash -c "[ \"\$('$bin/tandemadm' --config '$cfg' --node n1 status www --json | grep -c '\"Connected\"')\" = $((${#nodes[@]} - 1)) ]"
    adm n1 new-current-uuid --clear-bitmap www
  fi
  # Dual-primary: every node writes the volume (allow-two-primaries in the config).
  for n in "${disk_nodes[@]}"; do volume_primary "$n"; done
  for n in "${nodes[@]}"; do
    start_daemon "$n" lockd "$bin/tandem-lockd" --config "$cfg" --node "$n"
  done
  wait_until 30 has_leader n1
  local uri="nbd+unix:///www?socket=$demo/run/n1/nbd-www.sock"
  if ! "$bin/tandemfs" fsck -n "$uri" >/dev/null 2>&1; then
    "$bin/tandemfs" mkfs -q -t demo:www -j "${#disk_nodes[@]}" -p lock_tandem "$uri"
  fi
  for n in "${disk_nodes[@]}"; do mount_node "$n"; done
  if [ "$web" = 1 ] || [ -f "$demo/web.enabled" ]; then start_web; web=1; fi
  cat <<EOF

Tandem demo cluster is up: ${#nodes[@]} nodes (${nodes[*]}${tb_nodes[*]:+; diskless tiebreakers: ${tb_nodes[*]}}) in network namespaces $ns-n1..,
replicated volume "www" ($size, protocol C) on file-backed disks in $demo/disks.

  inspect:   $bin/tandemadm --config $cfg --node n1 status
             $bin/tandemadm --config $cfg --node n2 events --now
             $bin/tandem-lockctl --config $cfg --node n1 status
  use:       echo hello > $demo/mnt/n1/hello.txt; cat $demo/mnt/n2/hello.txt
             one cluster filesystem mounted on every node ($demo/mnt/n1..), each from
             its own replica of the dual-primary volume, kept coherent by tandem-lockd;
             glock statistics: cat $demo/run/n1/tandemfs-*.glstats
  NBD:       nbdinfo 'nbd+unix:///www?socket=$demo/run/n2/nbd-www.sock'
EOF
  if [ "$web" = 1 ]; then
    cat <<EOF
  web:       http://$hubip/  (HAProxy, round robin over every node's nginx), reached
             from the hub namespace $hub (the cluster's network is private):
             for i in 1 2 3 4 5 6; do ip netns exec $hub curl -s http://$hubip/whoami; done
             ip netns exec $hub curl -si http://$hubip/ | grep -e X-Served-By -e 'Served by'
             ip netns exec $hub curl -s 'http://$hubip/haproxy-stats;csv' | cut -d, -f1,2,18
             one node's nginx directly: ip netns exec $hub curl -s http://$net.2/whoami
  failover:  ./tandem demo kill-node n3      (SIGKILL every process of n3; requests go on)
             ./tandem demo restart-node n3   (resync, mount, nginx: back in the rotation)
EOF
  else
    echo "  web:       ./tandem demo --web   (nginx on every node, HAProxy in front)"
  fi
  echo "  stop:      ./tandem demo stop"
}

status() {
  for n in "${nodes[@]}"; do
    echo "== $n"
    adm "$n" status || true
    "$bin/tandem-lockctl" --config "$cfg" --node "$n" status 2>/dev/null || true
  done
  if alive "$demo/pids/haproxy.pid"; then
    echo "== HAProxy http://$hubip/ in namespace $hub (server, status)"
    ip netns exec "$hub" curl -s -m 2 "http://$hubip/haproxy-stats;csv" | awk -F, '$1 == "nodes" && $2 != "BACKEND" { print "  " $2 " " $18 }' || true
  fi
}

# The PIDs of a node's processes (nginx: the master and its workers).
node_pids() { # node
  local n="$1" what p
  for what in nginx fs lockd replicatord; do
    alive "$demo/pids/$n-$what.pid" || continue
    p=$(cat "$demo/pids/$n-$what.pid")
    echo "$p"
    if [ "$what" = nginx ]; then pgrep -P "$p" || true; fi
  done
}

kill_node() { # node
  need_root
  local n="$1" pids
  node_index "$n" >/dev/null
  mapfile -t pids < <(node_pids "$n")
  if [ ${#pids[@]} -eq 0 ]; then echo "demo: no process of $n is running"; return 0; fi
  kill -KILL "${pids[@]}" 2>/dev/null || true
  echo "demo: $n crashed: SIGKILL to ${pids[*]} (nginx, mount daemon, tandem-lockd, tandem-replicatord)"
  echo "      the others go on; bring it back with ./tandem demo restart-node $n"
}

restart_node() { # node
  need_root
  local n="$1" t0 t
  node_index "$n" >/dev/null
  [ -f "$cfg" ] || { echo "demo: no demo in $demo: ./tandem demo start first" >&2; exit 1; }
  make_net
  t0=$(now)
  volume_up "$n"
  adm "$n" wait-sync www --timeout-s 120 >/dev/null || {
    echo "demo: $n's volume did not resync in 120 s; see $demo/logs/$n-replicatord.log and tandemadm status" >&2; exit 1; }
  t=$(since "$t0")
  if is_tb "$n"; then
    start_daemon "$n" lockd "$bin/tandem-lockd" --config "$cfg" --node "$n"
    echo "demo: $n is back: diskless tiebreaker connected after ${t}s, tandem-lockd witness"
    return 0
  fi
  adm "$n" primary www >/dev/null
  start_daemon "$n" lockd "$bin/tandem-lockd" --config "$cfg" --node "$n"
  wait_until 30 has_leader "$n" >/dev/null || {
    echo "demo: $n's tandem-lockd found no leader in 30 s; see $demo/logs/$n-lockd.log" >&2; exit 1; }
  mount_node "$n"
  if [ -f "$demo/web.enabled" ]; then start_nginx "$n"; fi
  echo "demo: $n is back: volume UpToDate after ${t}s, Primary, tandem-lockd, mounted at $demo/mnt/$n$([ -f "$demo/web.enabled" ] && echo ", nginx") (total $(since "$t0")s)"
}

stop_pid() { # pidfile: SIGTERM, up to 5 s, then SIGKILL
  local f="$1" p
  [ -f "$f" ] || return 0
  if alive "$f"; then
    p=$(cat "$f")
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$f" || break; sleep 0.1; done
    if alive "$f"; then kill -9 "$p" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}

stop() {
  need_root
  # Web servers first: their mount namespaces hold copies of the FUSE mounts.
  stop_pid "$demo/pids/haproxy.pid"
  local f p workers
  for f in "$demo"/pids/*-nginx.pid; do
    [ -f "$f" ] || continue
    # A worker stuck in a filesystem request outlives its master's SIGTERM.
    workers=()
    if alive "$f"; then mapfile -t workers < <(pgrep -P "$(cat "$f")" || true); fi
    stop_pid "$f"
    for p in "${workers[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  done
  for m in "$demo"/mnt/*; do
    if is_mounted "$m"; then umount "$m" 2>/dev/null || umount -l "$m"; fi
  done
  # The mount daemons give their locks back to lockd as they exit: let them finish.
  for f in "$demo"/pids/*-fs.pid; do stop_pid "$f"; done
  # Mount daemons of an older demo (daemonized, no PID file).
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
  rm -f "$demo/web.enabled"
  for n in "${nodes[@]}"; do ip netns del "$ns-$n" 2>/dev/null || true; done
  ip netns del "$hub" 2>/dev/null || true
  echo "demo: stopped (data kept in $demo; remove it with rm -rf $demo)"
}

need_node() {
  [ -n "$node_arg" ] || { echo "demo: $action needs a node name (${nodes[*]})" >&2; exit 2; }
}

case "$action" in
  start) start ;;
  status) status ;;
  stop) stop ;;
  kill-node) need_node; kill_node "$node_arg" ;;
  restart-node) need_node; restart_node "$node_arg" ;;
esac
