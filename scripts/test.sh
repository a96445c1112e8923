#!/usr/bin/env bash
# The test command (README, CI): formatting, lints, every crate's tests, the namespace
# scenarios, the Pacemaker and seed-scenario (nginx + HAProxy) end-to-end tests and the
# fuzz-corpus replays. Needs root for namespaces and FUSE.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/install-deps.sh pacemaker corosync pcs resource-agents libxml2-utils shellcheck nginx-light curl
export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== shellcheck (./tandem, scripts/)"
shellcheck tandem scripts/*.sh scripts/lib/*.sh
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build binaries (tests drive the real daemons)"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace -- --test-threads=2
echo "== OCF agents in a real Pacemaker cluster (ocf-agents/tests/pacemaker-test.sh)"
./ocf-agents/tests/pacemaker-test.sh
# After the Pacemaker test, never beside it: both take ${TANDEM_PCMK_DIR:-/tmp/tandem-pcmk}.lock.
echo "== seed scenario: demo --web (nginx + HAProxy), kill -9 drill under wrk (scripts/seed-test.sh)"
./scripts/seed-test.sh
if [ -f fuzz/Cargo.toml ]; then
  echo "== fuzz corpus replay (stable toolchain)"
  # Built into the main target/: the dependencies compiled above are reused (a separate
  # fuzz/target cost CI about six minutes of recompiling them).
  CARGO_TARGET_DIR="$PWD/target" cargo test --manifest-path fuzz/Cargo.toml -- --test-threads=2
fi
