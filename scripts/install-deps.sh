#!/usr/bin/env bash
# Installs the Debian packages Tandem's tools, tests and demo use, when missing.
# Safe to run repeatedly; does nothing when everything is present or when not root.
set -euo pipefail
# nftables: the fault-injection tests drop packets and redirect connections to the
# delay proxy with it (tests/src/faults.rs). strace: fs/tests/posix.rs counts the getxattr
# calls of `ls -l`. acl: setfacl/getfacl for the POSIX ACL tests of fs/tests/posix.rs.
pkgs=(iproute2 nftables fuse3 libnbd-bin nbdkit qemu-utils fio psmisc util-linux procps e2fsprogs strace acl)
# The seed scenario (demo --web, scripts/seed-test.sh, bench web): HAProxy in front of
# every node's nginx (nginx-light and curl are asked for by those commands), wrk for load.
pkgs+=(haproxy wrk)
pkgs+=("$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages ${missing[*]} (run as root to install them)" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq "${missing[@]}" >/tmp/tandem-apt.log 2>&1; then
  apt-get update -qq >>/tmp/tandem-apt.log 2>&1
  apt-get install -y -qq "${missing[@]}" >>/tmp/tandem-apt.log 2>&1 || {
    tail -20 /tmp/tandem-apt.log >&2; exit 1; }
fi
