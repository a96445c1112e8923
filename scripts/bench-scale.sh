#!/usr/bin/env bash
# ./tandem bench scale: memory and CPU per node of an N-node cluster (default 5: 3 with
# disks, 2 diskless tiebreakers), idle and under web load. Starts its own demo cluster (release build, directory
# /var/tmp/tandem-bench-scale, namespaces tscale-*) with nginx on every node and HAProxy
# in front, writes 200 files of 8 KiB, then samples every Tandem process of every node
# (tandem-replicatord, tandem-lockd, the tandemfs mount daemon) and nginx:
#   idle: 10 s with nothing running; load: wrk through HAProxy (all nodes in rotation)
#   while n1 writes 10 new 8 KiB files per second through its mount.
# Printed per node and process: RSS (MiB) and CPU (% of one core) in each phase.
# Not part of the tests. Env: TANDEM_BENCH_NODES (5), TANDEM_BENCH_DISKLESS (2: the last
# nodes are diskless tiebreakers and lockd witnesses, no mount, no nginx), TANDEM_BENCH_SECONDS (15),
# TANDEM_BENCH_CONNECTIONS (16), TANDEM_BENCH_UPLOADS (1 = the writer on n1, 0 = web
# load only), TANDEM_BIN_DIR (default target/release).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TANDEM_BIN_DIR=${TANDEM_BIN_DIR:-$repo/target/release}
export TANDEM_DEMO_DIR=/var/tmp/tandem-bench-scale
export TANDEM_DEMO_NS=tscale TANDEM_DEMO_NET=10.213.203
export TANDEM_DEMO_NODES=${TANDEM_BENCH_NODES:-5}
export TANDEM_DEMO_DISKLESS=${TANDEM_BENCH_DISKLESS:-2}
D=$TANDEM_DEMO_DIR
SECS=${TANDEM_BENCH_SECONDS:-15}
CONNS=${TANDEM_BENCH_CONNECTIONS:-16}
UPLOADS=${TANDEM_BENCH_UPLOADS:-1}
HUB=tscale-hub
HAPROXY=10.213.203.254
HZ=$(getconf CLK_TCK)

# shellcheck source=scripts/lib/preflight.sh
. "$repo/scripts/lib/preflight.sh"
preflight "bench scale" "cargo build --release --workspace --bins" nginx haproxy wrk curl

demo() { "$repo/scripts/demo.sh" "$@" 9>&-; }
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  demo stop >/dev/null 2>&1 || true
  if [ "$rc" = 0 ]; then rm -rf "$D"; else echo "bench scale: logs kept in $D/logs" >&2; rm -rf "$D/disks"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

demo stop >/dev/null 2>&1 || true
rm -rf "$D"
mkdir -p "$D"
echo "bench scale: starting a $TANDEM_DEMO_NODES-node cluster ($TANDEM_DEMO_DISKLESS diskless) with nginx + HAProxy"
demo start --web >"$D.start.log" 2>&1 || { cat "$D.start.log"; rm -f "$D.start.log"; echo "bench scale: demo start failed (above)" >&2; exit 1; }
mv "$D.start.log" "$D/logs/demo-start.log"
mkdir -p "$D/mnt/n1/bench"
for k in $(seq 0 199); do head -c 8192 /dev/urandom >"$D/mnt/n1/bench/f$k.bin"; done
cat >"$D/random.lua" <<'EOF'
math.randomseed(42)
request = function()
  return wrk.format("GET", "/bench/f" .. math.random(0, 199) .. ".bin")
end
EOF

# Processes to sample: "node what pid" lines (nginx: master and workers summed later).
procs() {
  local n what f p
  for n in $(seq 1 "$TANDEM_DEMO_NODES"); do
    for what in replicatord lockd fs nginx; do
      f="$D/pids/n$n-$what.pid"
      [ -f "$f" ] || continue
      p=$(cat "$f")
      echo "n$n $what $p"
      if [ "$what" = nginx ]; then
        for w in $(pgrep -P "$p" || true); do echo "n$n $what $w"; done
      fi
    done
  done
}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# sample SECONDS CMD... -> "node what rss_kib cpu_percent" per process, while CMD runs
sample() {
  local secs="$1"; shift
  local -A t0 peak
  local list line n what p
  list=$(procs)
  while read -r n what p; do t0[$p]=$(ticks "$p"); peak[$p]=0; done <<<"$list"
  local start end
  start=$(date +%s.%N)
  "$@" &
  local job=$!
  for _ in $(seq 1 "$secs"); do
    sleep 1
    while read -r n what p; do
      r=$(rss_kib "$p")
      if [ "$r" -gt "${peak[$p]}" ]; then peak[$p]=$r; fi
    done <<<"$list"
  done
  wait "$job" || true
  end=$(date +%s.%N)
  while read -r n what p; do
    line=$(awk -v a="${t0[$p]}" -v b="$(ticks "$p")" -v hz="$HZ" -v s="$start" -v e="$end" \
      'BEGIN { printf "%.1f", (b - a) / hz / (e - s) * 100 }')
    echo "$n $what ${peak[$p]} $line"
  done <<<"$list"
}

echo "bench scale: idle for 10 s"
idle=$(sample 10 sleep 10)
echo "bench scale: load for $SECS s (wrk -t1 -c$CONNS through HAProxy, all nodes)"
# The web load, plus a writer on n1 (10 new 8 KiB files per second, like uploads), so the
# replicator and the lock manager work too.
wrk_load() {
  local end=$((SECONDS + SECS)) k=0
  ip netns exec "$HUB" wrk -t1 -c"$CONNS" -d"${SECS}s" --timeout 10s -s "$D/random.lua" "http://$HAPROXY:80/" >"$D/logs/wrk.log" 2>&1 &
  while [ "$UPLOADS" != 0 ] && [ "$SECONDS" -lt "$end" ]; do
    head -c 8192 /dev/urandom >"$D/mnt/n1/bench/upload$k.bin"
    k=$((k + 1))
    sleep 0.1
  done
  wait
  echo "$k" >"$D/logs/uploads"
}
load=$(sample "$SECS" wrk_load)

# Sum nginx master + workers per node, then print one table.
summ() { awk '{ k = $1 " " $2; rss[k] += $3; cpu[k] += $4 } END { for (k in rss) print k, rss[k], cpu[k] }' | sort; }
printf '\n%-5s %-19s %14s %12s %14s %12s\n' node process "idle RSS MiB" "idle CPU %" "load RSS MiB" "load CPU %"
join -j1 <(summ <<<"$idle" | awk '{ print $1 "/" $2, $3, $4 }') <(summ <<<"$load" | awk '{ print $1 "/" $2, $3, $4 }') |
  awk '{ split($1, k, "/"); name = k[2] == "fs" ? "tandemfs" : (k[2] == "nginx" ? "nginx" : "tandem-" k[2])
    printf "%-5s %-19s %14.1f %12s %14.1f %12s\n", k[1], name, $2 / 1024, $3, $4 / 1024, $5
    ti[k[1]] += $2; tc[k[1]] += $3; li[k[1]] += $4; lc[k[1]] += $5 }
    END { for (n in ti) printf "%-5s %-19s %14.1f %12.1f %14.1f %12.1f\n", n, "all", ti[n] / 1024, tc[n], li[n] / 1024, lc[n] }' |
  sort -k1,1 -s
echo "(RSS: peak of 1 s samples; CPU: % of one core over the phase; $(nproc) cores on this machine)"
echo "load: $(awk '/Requests\/sec/ { print $2 }' "$D/logs/wrk.log") req/s through HAProxy ($(awk '/Socket errors/ { gsub(",", ""); e += $4 + $6 + $8 + $10 } /Non-2xx/ { e += $NF } END { print e + 0 }' "$D/logs/wrk.log") failed), $(cat "$D/logs/uploads") files written through n1"
