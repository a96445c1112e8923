#!/usr/bin/env bash
# Shared checks of the scripts that run their own demo cluster (seed-test.sh,
# bench-web.sh). Source it, then call preflight NAME BUILD_HINT COMMAND...
#   NAME        prefix of the error messages
#   BUILD_HINT  what to run when a Tandem binary in $TANDEM_BIN_DIR is missing
#   COMMAND...  system commands that must be on PATH (installed by install-deps)
# Then it takes the lock the Pacemaker test takes (fd 9), waiting up to 10 minutes: the
# runs share the CPU and are timing-sensitive on 2 cores. Callers must not pass fd 9 on
# to daemons they start (`9>&-`), or the daemons would hold the lock after they end.

preflight() {
  local name=$1 hint=$2 b
  shift 2
  [ "$(id -u)" = 0 ] || { echo "$name: needs root (network namespaces, FUSE): run it with sudo" >&2; exit 1; }
  for b in tandem-replicatord tandemadm tandem-lockd tandem-lockctl tandemfs; do
    [ -x "$TANDEM_BIN_DIR/$b" ] || { echo "$name: $TANDEM_BIN_DIR/$b missing: $hint" >&2; exit 1; }
  done
  for b in "$@"; do
    command -v "$b" >/dev/null || { echo "$name: $b missing: ./scripts/install-deps.sh nginx-light curl" >&2; exit 1; }
  done
  local lock="${TANDEM_PCMK_DIR:-/tmp/tandem-pcmk}.lock"
  exec 9>"$lock"
  if ! flock -n 9; then
    echo "$name: the Pacemaker test, the seed test or the web benchmark holds $lock; waiting (up to 10 min)" >&2
    flock -w 600 9 || { echo "$name: $lock still held after 10 min" >&2; exit 1; }
  fi
}
