#!/usr/bin/env bash
# Installs Tandem's binaries (release build) into $PREFIX/sbin (default /usr/local), with
# the names users type: mkfs.tandem, fsck.tandem and mount.tandem (so `mount -t tandem`
# works) as links to the multi-call tandemfs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
prefix="${PREFIX:-/usr/local}"
./scripts/install-deps.sh
cargo build --release --workspace --bins --quiet
install -d "$prefix/sbin"
for b in tandem-replicatord tandemadm tandem-lockd tandem-lockctl tandemfs; do
  install -m 0755 "target/release/$b" "$prefix/sbin/$b"
done
for t in mkfs fsck mount; do
  ln -sf tandemfs "$prefix/sbin/$t.tandem"
done
# mount(8) looks for helpers in /sbin.
if [ "$prefix/sbin" != /sbin ] && [ -w /sbin ]; then
  ln -sf "$prefix/sbin/tandemfs" /sbin/mount.tandem
fi
# Pacemaker resource agents (ocf:tandem:*) and the fencing alert agent.
ocf_root="${OCF_ROOT:-/usr/lib/ocf}"
install -d "$ocf_root/resource.d/tandem" "$ocf_root/lib/tandem"
for a in replicator lockmgr fs; do
  install -m 0755 "ocf-agents/tandem/$a" "$ocf_root/resource.d/tandem/$a"
done
install -m 0755 ocf-agents/alerts/tandem-fence-alert "$ocf_root/lib/tandem/tandem-fence-alert"
echo "installed into $prefix/sbin: tandem-replicatord tandemadm tandem-lockd tandem-lockctl mkfs.tandem fsck.tandem mount.tandem"
echo "installed OCF agents ocf:tandem:replicator, ocf:tandem:lockmgr, ocf:tandem:fs into $ocf_root/resource.d/tandem"
