#!/usr/bin/env bash
# Benchmarks (not part of the test pass/fail). Each prints ratios against the raw disk /
# ext4 measured in the same run, because absolute times on shared machines mislead.
#   ./tandem bench [replicator|fs] [-- extra args for tandem-bench / tandem-fsbench]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/install-deps.sh
what="${1:-replicator}"; shift || true
cargo build --release --workspace --bins
export TANDEM_BIN_DIR="$PWD/target/release" TMPDIR=/var/tmp RUST_LOG=warn
case "$what" in
  replicator) exec ./target/release/tandem-bench "$@" ;;
  fs) exec ./target/release/tandem-fsbench "$@" ;;
  *) echo "bench: unknown benchmark '$what' (replicator, fs)" >&2; exit 2 ;;
esac
