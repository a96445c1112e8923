#!/usr/bin/env bash
# Benchmarks (not part of the test pass/fail). Each prints ratios against the raw disk /
# ext4 measured in the same run, because absolute times on shared machines mislead.
#   ./tandem bench [replicator|fs|lock] [-- extra args for tandem-bench / tandem-fsbench /
#                                       tandem-lockbench]
#   ./tandem bench web   nginx + HAProxy on a 2-node cluster vs on ext4 (scripts/bench-web.sh)
#   ./tandem bench scale memory and CPU per node of a 5-node cluster, idle and under web load
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what="${1:-replicator}"; shift || true
if [ "$what" = web ] || [ "$what" = scale ]; then ./scripts/install-deps.sh nginx-light curl; else ./scripts/install-deps.sh; fi
cargo build --release --workspace --bins
export TANDEM_BIN_DIR="$PWD/target/release" TMPDIR=/var/tmp RUST_LOG=warn
case "$what" in
  # The SyncSource logs its own resync rate at info level; the bench reads it.
  replicator) RUST_LOG="warn,tandem_replicator::engine::sync=info" exec ./target/release/tandem-bench "$@" ;;
  fs) exec ./target/release/tandem-fsbench "$@" ;;
  lock) exec ./target/release/tandem-lockbench "$@" ;;
  web) exec ./scripts/bench-web.sh "$@" ;;
  scale) exec ./scripts/bench-scale.sh "$@" ;;
  *) echo "bench: unknown benchmark '$what' (replicator, fs, lock, web, scale)" >&2; exit 2 ;;
esac
