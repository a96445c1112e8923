#!/usr/bin/env bash
# ./tandem bench web: the seed scenario's web tier under load, against a local-disk baseline
# in the same run. A 2-node demo cluster (release build, its own directory, namespaces
# tbench-*) with nginx on each node and HAProxy in front serves 8 KiB files from the
# Tandem cluster filesystem; the same nginx processes (a second server block on port 81)
# behind the same HAProxy (a second frontend) serve the same files from ext4 on a loop
# device. wrk, in the hub namespace, fetches random files through HAProxy from each in
# turn; printed: requests/s, p50 and p99 latency, and the ratio Tandem/ext4.
# Not part of the tests. Env: TANDEM_BIN_DIR (default target/release), TANDEM_BENCH_DIR
# (default /var/tmp/tandem-bench-web), TANDEM_BENCH_SECONDS (15 per run),
# TANDEM_BENCH_CONNECTIONS (16), TANDEM_BENCH_ROUNDS (2, alternating Tandem and ext4).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TANDEM_BIN_DIR=${TANDEM_BIN_DIR:-$repo/target/release}
export TANDEM_DEMO_DIR=${TANDEM_BENCH_DIR:-/var/tmp/tandem-bench-web}
export TANDEM_DEMO_NS=tbench TANDEM_DEMO_NET=10.213.202 TANDEM_DEMO_NODES=2
D=$TANDEM_DEMO_DIR
EXT4=$D/ext4
export TANDEM_DEMO_WEB_BASELINE=$EXT4
SECS=${TANDEM_BENCH_SECONDS:-15}
CONNS=${TANDEM_BENCH_CONNECTIONS:-16}
ROUNDS=${TANDEM_BENCH_ROUNDS:-2}
FILES=200
HUB=tbench-hub
HAPROXY=10.213.202.254

# shellcheck source=scripts/lib/preflight.sh
. "$repo/scripts/lib/preflight.sh"
preflight "bench web" "cargo build --release --workspace --bins" nginx haproxy wrk curl mkfs.ext4 flock

demo() { "$repo/scripts/demo.sh" "$@" 9>&-; }
ext4_mounted() { awk -v d="$EXT4" '$5 == d { found = 1 } END { exit !found }' /proc/self/mountinfo; }
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  demo stop >/dev/null 2>&1 || true
  if ext4_mounted; then umount "$EXT4" || umount -l "$EXT4"; fi
  if [ "$rc" = 0 ]; then rm -rf "$D"; else echo "bench web: logs kept in $D/logs" >&2; rm -rf "$D/disks" "$D/ext4.img"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

demo stop >/dev/null 2>&1 || true
if ext4_mounted; then umount "$EXT4"; fi
rm -rf "$D"
mkdir -p "$D" "$EXT4"
truncate -s 256M "$D/ext4.img"
mkfs.ext4 -q -F "$D/ext4.img"
mount -o loop "$D/ext4.img" "$EXT4"
echo "bench web: starting a 2-node cluster with nginx + HAProxy (binaries from $TANDEM_BIN_DIR)"
demo start --web >"$D.start.log" 2>&1 || { cat "$D.start.log"; rm -f "$D.start.log"; echo "bench web: demo start failed (above)" >&2; exit 1; }
mv "$D.start.log" "$D/logs/demo-start.log"

mkdir -p "$D/src" "$D/mnt/n1/bench" "$EXT4/bench"
for k in $(seq 0 $((FILES - 1))); do head -c 8192 /dev/urandom >"$D/src/f$k.bin"; done
cp "$D"/src/*.bin "$D/mnt/n1/bench/"
cp "$D"/src/*.bin "$EXT4/bench/"
sync
for port in 80 81; do
  got=$(ip netns exec "$HUB" curl -sf -m 10 "http://$HAPROXY:$port/bench/f7.bin" | cmp - "$D/src/f7.bin" && echo same) || true
  [ "$got" = same ] || { echo "bench web: HAProxy port $port does not serve bench/f7.bin as written" >&2; exit 1; }
done
cat >"$D/random.lua" <<EOF
math.randomseed(42)
request = function()
  return wrk.format("GET", "/bench/f" .. math.random(0, $((FILES - 1))) .. ".bin")
end
EOF

ms() { # wrk latency (123.45us, 1.20ms, 2.01s) -> milliseconds
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.2f", n }'
}
# run PORT SECONDS -> "rps p50ms p99ms errors"
run() {
  local out
  out=$(ip netns exec "$HUB" wrk -t1 -c"$CONNS" -d"$2s" --timeout 10s --latency -s "$D/random.lua" "http://$HAPROXY:$1/" 9>&-)
  echo "$out" >>"$D/logs/wrk.log"
  printf '%s %s %s %s\n' \
    "$(awk '/Requests\/sec/ { print $2 }' <<<"$out")" \
    "$(ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")" \
    "$(ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")" \
    "$(awk '/Socket errors/ { gsub(",", ""); e += $4 + $6 + $8 + $10 } /Non-2xx/ { e += $NF } END { print e + 0 }' <<<"$out")"
}

echo "bench web: warming up (3 s each)"
run 80 3 >/dev/null
run 81 3 >/dev/null
printf '\n%-7s %-24s %10s %9s %9s %7s\n' round "served from" "req/s" "p50 ms" "p99 ms" errors
tr=0; er=0; t99=0; e99=0
for r in $(seq 1 "$ROUNDS"); do
  read -r rps p50 p99 errs < <(run 80 "$SECS")
  printf '%-7s %-24s %10s %9s %9s %7s\n' "$r" "Tandem (2 nodes, FUSE)" "$rps" "$p50" "$p99" "$errs"
  tr=$(awk -v a="$tr" -v b="$rps" 'BEGIN { print a + b }'); t99=$(awk -v a="$t99" -v b="$p99" 'BEGIN { print a + b }')
  read -r rps p50 p99 errs < <(run 81 "$SECS")
  printf '%-7s %-24s %10s %9s %9s %7s\n' "$r" "ext4 (loop device)" "$rps" "$p50" "$p99" "$errs"
  er=$(awk -v a="$er" -v b="$rps" 'BEGIN { print a + b }'); e99=$(awk -v a="$e99" -v b="$p99" 'BEGIN { print a + b }')
done
awk -v tr="$tr" -v er="$er" -v t99="$t99" -v e99="$e99" -v n="$ROUNDS" 'BEGIN {
  printf "\nmean of %d rounds: Tandem %.0f req/s, p99 %.2f ms; ext4 %.0f req/s, p99 %.2f ms\n", n, tr / n, t99 / n, er / n, e99 / n
  printf "ratio Tandem/ext4: %.2fx requests/s, %.2fx p99 latency\n", tr / er, t99 / e99 }'
echo "(wrk -t1 -c$CONNS, ${SECS}s per run, $FILES files of 8 KiB at random, through HAProxy to nginx on both nodes)"
