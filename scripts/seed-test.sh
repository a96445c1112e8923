#!/usr/bin/env bash
# The seed scenario end to end (issue 8): the 3-node demo with nginx on every node and
# HAProxy in front (`./tandem demo --web`, in its own directory, namespaces and port so it
# never touches a user's running demo), then:
#   a) round robin: requests to /whoami through HAProxy reach every node;
#   b) a file written through n1's mount is served identically (sha256) by every node's
#      nginx directly and through HAProxy;
#   c) failure drill: wrk through HAProxy while every process of n3 (nginx, mount daemon,
#      tandem-lockd, tandem-replicatord) is killed -9; failed requests stay within a small
#      bound, the survivors keep serving and accept writes again (time printed); n3 is
#      restarted, resyncs to UpToDate, mounts, is back in HAProxy's rotation and serves the
#      file written during its outage.
# As root, after `cargo build --workspace --bins`:  scripts/seed-test.sh
# Env: TANDEM_BIN_DIR (default target/debug), TANDEM_SEED_DIR (default /tmp/tandem-seed),
# TANDEM_SEED_WRK_SECONDS (20),
# TANDEM_SEED_KEEP=1 leaves the cluster up at the end (stop it with the command printed).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TANDEM_BIN_DIR=${TANDEM_BIN_DIR:-$repo/target/debug}
export TANDEM_DEMO_DIR=${TANDEM_SEED_DIR:-/tmp/tandem-seed}
export TANDEM_DEMO_NS=tseed TANDEM_DEMO_NET=10.213.201 TANDEM_DEMO_NODES=3
D=$TANDEM_DEMO_DIR
NET=$TANDEM_DEMO_NET
# HAProxy, on the hub namespace's own address (everything runs in the private network).
URL="http://$NET.254"
WRK_SECONDS=${TANDEM_SEED_WRK_SECONDS:-20}
VICTIM=n3
# At most this many failed requests in the drill, or 0.1% of them if that is more: HAProxy
# retries what the kill breaks (retry-on conn-failure empty-response, redispatch to a
# survivor) and its health check takes n3 out within 2 s, so nothing should fail at all.
MAX_FAILED=5

T0=$(date +%s.%N)
log() { printf '[seed-test %5.1fs] %s\n' "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')" "$*"; }
fail() {
  log "FAIL: $*"
  exit 1
}
# fd 9 (the lock) is not passed on: the daemons would hold it after this script ends.
demo() { "$repo/scripts/demo.sh" "$@" 9>&-; }
hubcurl() { ip netns exec tseed-hub curl "$@"; }
hubwrk() { ip netns exec tseed-hub wrk "$@"; }
secs_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# shellcheck source=scripts/lib/preflight.sh
. "$repo/scripts/lib/preflight.sh"
preflight seed-test "cargo build --workspace --bins" nginx haproxy wrk curl sha256sum flock

STARTED=()   # PIDs of the background jobs this script started (not the demo's daemons)
cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in "${STARTED[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  if [ "$rc" != 0 ]; then
    log "logs of the failed run (last lines):"
    for f in "$D"/logs/*.log; do
      [ -s "$f" ] || continue
      echo "---- $f"
      tail -n 8 "$f"
    done
    if [ -d "$D/mnt" ]; then demo status 2>&1 | head -40 || true; fi
  fi
  if [ "${TANDEM_SEED_KEEP:-0}" = 1 ]; then
    log "TANDEM_SEED_KEEP=1: cluster left up; stop it with: TANDEM_DEMO_DIR=$D TANDEM_DEMO_NS=tseed $repo/scripts/demo.sh stop"
    exit "$rc"
  fi
  demo stop >/dev/null 2>&1 || true
  rm -f "$D.start.log"
  if [ "$rc" = 0 ]; then
    rm -rf "$D"
  else
    rm -rf "$D/disks"
    echo "seed-test: logs kept in $D/logs" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# bg_op SECONDS CMD...: runs CMD in the background with a deadline (a process blocked on a
# FUSE request cannot be killed while the daemon lives, so it is left to the final stop).
bg_op() {
  local t=$1 p i
  shift
  "$@" >"$D/op.out" 2>&1 9>&- &
  p=$!
  STARTED+=("$p")
  for i in $(seq 1 $((t * 20))); do
    if ! kill -0 "$p" 2>/dev/null; then
      wait "$p"
      return $?
    fi
    sleep 0.05
  done
  return 124
}

# whoami N: N requests to /whoami through HAProxy; prints the distinct node names seen.
whoami() {
  local k out
  for k in $(seq 1 "$1"); do
    out=$(hubcurl -sf -m 5 "$URL/whoami") || { echo "request $k failed" >&2; return 1; }
    echo "$out"
  done | sort | uniq -c | awk '{ printf "%s%s(%d)", (NR > 1 ? " " : ""), $2, $1 } END { print "" }'
}

sum_of() { sha256sum | cut -d' ' -f1; }

# --------------------------------------------------------------- start --
log "starting the 3-node demo with --web in $D (namespaces tseed-*, HAProxy $URL)"
demo stop >/dev/null 2>&1 || true
rm -rf "$D"
demo start --web >"$D.start.log" 2>&1 || { cat "$D.start.log"; fail "demo start --web (output above)"; }
mkdir -p "$D" && mv "$D.start.log" "$D/logs/demo-start.log"
log "cluster up: volume Primary on n1 n2 n3, lockd, mounts, nginx x3, HAProxy"
passed=0

# ------------------------------------------------------- a) round robin --
seen=$(whoami 9) || fail "/whoami through HAProxy"
log "9 x /whoami through HAProxy: $seen"
for n in n1 n2 n3; do
  [[ " $seen" == *" $n("* ]] || fail "round robin: $n never answered /whoami through HAProxy ($seen)"
done
page=$(hubcurl -sfi -m 5 "$URL/") || fail "index.html through HAProxy"
hdr=$(printf '%s\n' "$page" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-served-by" { print $2 }')
grep -q "Served by node <b>$hdr</b>" <<<"$page" || fail "index.html does not name the node of its X-Served-By header '$hdr'"
log "PASS a) round robin reaches every node; index.html names its node ($hdr) as X-Served-By does"
passed=$((passed + 1))

# ---------------------------------------------- b) one file, every node --
mkdir -p "$D/mnt/n1/seed"
head -c 65536 /dev/urandom >"$D/blob.bin"
head -c 8192 /dev/urandom >"$D/mnt/n1/seed/load.bin"
cp "$D/blob.bin" "$D/mnt/n1/seed/blob.bin"
sync "$D/mnt/n1/seed/blob.bin"
want=$(sum_of <"$D/blob.bin")
for i in 1 2 3; do
  got=$(hubcurl -sf -m 10 "http://$NET.$i/seed/blob.bin" | sum_of) || fail "nginx of n$i does not serve seed/blob.bin"
  [ "$got" = "$want" ] || fail "nginx of n$i served seed/blob.bin with sha256 $got, n1 wrote $want"
done
for k in 1 2 3 4 5 6; do
  got=$(hubcurl -sf -m 10 "$URL/seed/blob.bin" | sum_of) || fail "HAProxy request $k for seed/blob.bin failed"
  [ "$got" = "$want" ] || fail "HAProxy request $k served seed/blob.bin with sha256 $got, n1 wrote $want"
done
log "PASS b) a 64 KiB file written through n1's mount: same sha256 from nginx of n1, n2, n3 and 6 x through HAProxy"
passed=$((passed + 1))

# ------------------------------------------------------ c) failure drill --
log "drill: wrk through HAProxy for ${WRK_SECONDS}s (8 KiB file); $VICTIM is killed -9 after 5s"
hubwrk -t1 -c8 -d"${WRK_SECONDS}s" --timeout 10s --latency "$URL/seed/load.bin" >"$D/wrk.out" 2>&1 9>&- &
wrk_pid=$!
STARTED+=("$wrk_pid")
sleep 5
t_kill=$(date +%s.%N)
demo kill-node "$VICTIM" | sed -n '1s/^/    /p' # sed reads it all: no SIGPIPE under pipefail
# A write through a survivor waits (it does not fail) until the lock manager has declared
# n3 dead and fenced it (3 voters: automatic) and a survivor replayed n3's journal.
bg_op 60 sh -c "echo 'written during the outage of $VICTIM' > '$D/mnt/n1/seed/outage.txt' && sync '$D/mnt/n1/seed/outage.txt'" ||
  fail "a write through n1's mount after the kill did not finish in 60 s: $(cat "$D/op.out")"
t_write=$(secs_since "$t_kill")
log "kill -9 of $VICTIM -> n1 accepts writes again after ${t_write}s"
bg_op 30 sh -c "echo 'n2 too' > '$D/mnt/n2/seed/outage-n2.txt'" || fail "a write through n2's mount after the kill failed: $(cat "$D/op.out")"
seen=$(whoami 6) || fail "/whoami through HAProxy during the outage"
[[ "$seen" != *"$VICTIM("* ]] || fail "HAProxy still sends requests to the dead $VICTIM: $seen"
for i in 1 2; do
  got=$(hubcurl -sf -m 10 "http://$NET.$i/seed/outage.txt") || fail "nginx of n$i does not serve seed/outage.txt during the outage"
  [ "$got" = "written during the outage of $VICTIM" ] || fail "nginx of n$i served '$got' for seed/outage.txt"
done
log "survivors serve (/whoami: $seen) and both wrote through their mounts"
wait "$wrk_pid" || fail "wrk failed: $(cat "$D/wrk.out")"
total=$(awk '/requests in/ { print $1 }' "$D/wrk.out")
sock=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$D/wrk.out")
non2xx=$(awk '/Non-2xx or 3xx/ { print $NF }' "$D/wrk.out")
rps=$(awk '/Requests\/sec/ { print $2 }' "$D/wrk.out")
p99=$(awk '$1 == "99%" { print $2 }' "$D/wrk.out")
maxlat=$(awk '$1 == "Latency" { print $4 }' "$D/wrk.out")
failed=$((${sock:-0} + ${non2xx:-0}))
sed 's/^/    /' "$D/wrk.out"
[ -n "$total" ] || fail "no wrk summary: $(cat "$D/wrk.out")"
bound=$((total / 1000 > MAX_FAILED ? total / 1000 : MAX_FAILED))
log "wrk: $total requests in ${WRK_SECONDS}s ($rps req/s), failed $failed (socket errors ${sock:-0}, non-2xx ${non2xx:-0}), p99 $p99, max $maxlat"
[ "$total" -ge 100 ] || fail "only $total requests in ${WRK_SECONDS}s through HAProxy: $(cat "$D/wrk.out")"
[ "$failed" -le "$bound" ] || fail "$failed of $total requests failed during the kill of $VICTIM (bound $bound): $(cat "$D/wrk.out")"
log "PASS c1) kill -9 of every process of $VICTIM under load: $failed/$total failed (bound $bound), survivors serve and write (writes again after ${t_write}s)"
passed=$((passed + 1))

# ------------------------------------------------------ c) rejoin --
t_restart=$(date +%s.%N)
out=$(demo restart-node "$VICTIM" 2>&1) || { echo "$out"; fail "demo restart-node $VICTIM"; }
t_resync=$(sed -n 's/.*UpToDate after \([0-9.]*\)s.*/\1/p' <<<"$out")
log "$out"
st=$("$TANDEM_BIN_DIR/tandemadm" --config "$D/cluster.toml" --node "$VICTIM" status www)
grep -q 'disk:UpToDate' <<<"$st" || fail "$VICTIM is not UpToDate after the restart: $st"
[ "$(grep -c 'peer-disk:UpToDate' <<<"$st")" = 2 ] || fail "$VICTIM does not see both peers UpToDate: $st"
grep -q "role:Primary" <<<"$(head -1 <<<"$st")" || fail "$VICTIM is not Primary again: $st"
# Back in HAProxy's rotation once its health check passed (rise 2, inter 1s).
back=""
for _ in $(seq 1 30); do
  seen=$(whoami 6) || fail "/whoami through HAProxy after the restart"
  if [[ "$seen" == *"$VICTIM("* ]]; then back=$(secs_since "$t_restart"); break; fi
  sleep 0.5
done
[ -n "$back" ] || fail "$VICTIM is not back in HAProxy's rotation 15 s after its restart ($seen)"
i=${VICTIM#n}
got=$(hubcurl -sf -m 10 "http://$NET.$i/seed/outage.txt") || fail "nginx of $VICTIM does not serve the file written during its outage"
[ "$got" = "written during the outage of $VICTIM" ] || fail "nginx of $VICTIM served '$got' for seed/outage.txt"
got=$(cat "$D/mnt/$VICTIM/seed/outage-n2.txt") || fail "$VICTIM's mount cannot read seed/outage-n2.txt"
[ "$got" = "n2 too" ] || fail "$VICTIM read '$got' from seed/outage-n2.txt"
got=$(hubcurl -sf -m 10 "http://$NET.$i/seed/blob.bin" | sum_of)
[ "$got" = "$want" ] || fail "nginx of $VICTIM served seed/blob.bin with sha256 $got after the rejoin"
echo "written by $VICTIM after its rejoin" >"$D/mnt/$VICTIM/seed/rejoined.txt" || fail "$VICTIM cannot write after the rejoin"
got=$(hubcurl -sf -m 10 "http://$NET.1/seed/rejoined.txt") || fail "nginx of n1 does not serve the file $VICTIM wrote after its rejoin"
[ "$got" = "written by $VICTIM after its rejoin" ] || fail "n1 served '$got' for seed/rejoined.txt"
log "PASS c2) $VICTIM restarted: UpToDate after ${t_resync:-?}s, back in HAProxy's rotation after ${back}s ($seen), serves the files written during its outage, writes again"
passed=$((passed + 1))

log "timings: kill -9 -> survivors write ${t_write}s; restart -> UpToDate ${t_resync:-?}s; restart -> in rotation ${back}s; drill $failed/$total failed, p99 $p99"
echo "seed-test: $passed passed, 0 failed"
