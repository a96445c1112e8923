#!/bin/bash
# Tandem's OCF agents in a real corosync + Pacemaker cluster (network namespaces, no
# systemd), driven by ocf-agents/tests/pcmk-harness.sh. As root:
#
#   ocf-agents/tests/pacemaker-test.sh [2] [3]     (default: 2 3)
#
# 1. shellcheck and ocf-tester on all three agents (2-node round).
# 2. For each cluster size: a Tandem cluster.toml for the nodes (plus a lock-manager
#    witness outside Pacemaker for 2 nodes), volume `www` created and made UpToDate
#    without sync, a lock_tandem filesystem made on it, then the README's pcs commands
#    (promotable replicator clone promoted-max=N notify=true, lockmgr clone, fs clone,
#    order + colocation, an nginx clone when nginx is installed); checks: the volume is
#    Promoted on every node and the lockmgr and fs clones Started; a file written on one
#    node is read on the others (and served by nginx); a monitor failure (tandem-lockd
#    killed -9) is detected and recovered; every process of one node is killed and the
#    others keep serving; the node rejoins, resyncs and is Promoted again.
#
# The filesystem part is skipped, with the reason printed, only when mount.tandem says
# that cluster (lock_tandem) mounts are not supported yet; the volume is then checked at
# block level through the NBD exports instead.
#
# Env: TANDEM_BIN_DIR (binaries, default target/debug), TANDEM_PCMK_DIR (default
# /tmp/tandem-pcmk), TANDEM_PCMK_KEEP=1 keeps the cluster up at the end (for debugging),
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
H="$here/pcmk-harness.sh"
export TANDEM_BIN_DIR=${TANDEM_BIN_DIR:-$repo/target/debug}
export TANDEM_PCMK_DIR=${TANDEM_PCMK_DIR:-/tmp/tandem-pcmk}
D=$TANDEM_PCMK_DIR
NET=10.213.77
C=$D/tandem/cluster.toml
MNT=$D/www
AGENTS=/usr/lib/ocf/resource.d/tandem
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(2 3)

T0=$(date +%s)
log() { printf '[pacemaker-test %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
fail() {
	log "FAIL: $*"
	dump_state
	exit 1
}
FAILED_DUMPED=0
dump_state() {
	[ "$FAILED_DUMPED" = 1 ] && return
	FAILED_DUMPED=1
	local i
	for i in 1 2 3; do
		[ -d "$D/nodes/node$i" ] || continue
		echo "---- node$i: crm_mon"
		hx "$i" crm_mon -1 -r --include=failcounts 2>&1 | tail -40
		echo "---- node$i: tandem"
		hx "$i" tandemadm --config "$C" status 2>&1 | head -20
		hx "$i" tandem-lockctl --config "$C" --node "node$i" status 2>&1 | head -20
		echo "---- node$i: pacemaker log (agents)"
		grep -hE 'tandem|replicator|lockmgr|WebFS|WebData|ocf-exit' "$D/nodes/node$i/log/pacemaker/pacemaker.log" 2>/dev/null | tail -30
	done
}

[ "$(id -u)" = 0 ] || {
	echo "pacemaker-test: needs root (network namespaces, FUSE)" >&2
	exit 1
}
for b in corosync pacemakerd pcs crm_mon ocf-tester xmllint; do
	command -v "$b" >/dev/null || {
		echo "pacemaker-test: $b missing (./scripts/install-deps.sh pacemaker corosync pcs resource-agents libxml2-utils)" >&2
		exit 1
	}
done
for b in tandem-replicatord tandemadm tandem-lockd tandem-lockctl tandemfs; do
	[ -x "$TANDEM_BIN_DIR/$b" ] || {
		echo "pacemaker-test: $TANDEM_BIN_DIR/$b missing: cargo build --workspace --bins" >&2
		exit 1
	}
done

# One run at a time on this machine (same namespaces and directory): wait for another.
exec 9>"$D.lock"
if ! flock -n 9; then
	echo "pacemaker-test: another run holds $D.lock; waiting (up to 10 min)" >&2
	flock -w 600 9 || {
		echo "pacemaker-test: $D.lock still held after 10 min" >&2
		exit 1
	}
fi

hx() { # run in node N
	local n=$1
	shift
	bash "$H" exec "$n" "$@"
}

WITNESS_PID=""
cleanup() {
	local rc=$?
	if [ "${TANDEM_PCMK_KEEP:-0}" = 1 ]; then
		log "TANDEM_PCMK_KEEP=1: leaving the cluster up ($H status; $H down)"
		return
	fi
	stop_witness
	kill_cluster
	if [ "$rc" = 0 ]; then
		rm -rf "$D/tandem"
	else
		rm -rf "$D/tandem/disks" "$D/tandem/ocftest.img"
		echo "pacemaker-test: logs kept in $D/tandem/state (daemons) and $D/nodes/*/log (Pacemaker)" >&2
	fi
	exit $rc
}

# Power off every node at once (SIGKILL by PID, namespaces removed): no graceful Pacemaker
# shutdown that could wait on a hung mount.
kill_cluster() {
	local i
	# No fencing from here on: a survivor's fence must not boot a node again meanwhile.
	bash "$H" power-switch stop >/dev/null 2>&1
	for i in 1 2 3; do
		[ -f "$D/nodes/node$i/holder.pid" ] && bash "$H" crash "$i" >/dev/null 2>&1
	done
	bash "$H" down >/dev/null 2>&1
}

# fs_op SECONDS NODE CMD...: run CMD in NODE with a deadline; its output is in $OP_OUT.
# A process blocked on a hung FUSE request cannot be killed while the daemon lives, so
# the command runs in the background and is left to the final node kill on a timeout.
OP_OUT=""
fs_op() {
	local t=$1 n=$2 p i
	shift 2
	hx "$n" "$@" >"$D/op.out" 2>&1 &
	p=$!
	for i in $(seq 1 $((t * 5))); do
		if ! kill -0 "$p" 2>/dev/null; then
			wait "$p"
			i=$?
			OP_OUT=$(cat "$D/op.out")
			return $i
		fi
		sleep 0.2
	done
	OP_OUT="(no answer after ${t}s: hung)"
	return 124
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop_witness() {
	if [ -n "$WITNESS_PID" ] && [ -d "/proc/$WITNESS_PID" ] &&
		tr '\0' ' ' <"/proc/$WITNESS_PID/cmdline" | grep -q "tandem-lockd --config $C --node witness"; then
		kill -TERM "$WITNESS_PID" 2>/dev/null
		for _ in $(seq 1 50); do [ -d "/proc/$WITNESS_PID" ] || break; sleep 0.1; done
		kill -KILL "$WITNESS_PID" 2>/dev/null
	fi
	WITNESS_PID=""
}

# Waits until Pacemaker has no pending actions, then checks SPEC... (see state_ok).
settled_ok() {
	hx 1 crm_resource --wait --timeout=20s >/dev/null 2>&1 && state_ok 1 "$@"
}

# wait_for SECONDS DESCRIPTION CMD...
wait_for() {
	local t=$1 what=$2 end
	shift 2
	end=$(($(date +%s) + t))
	while [ "$(date +%s)" -lt "$end" ]; do
		"$@" >/dev/null 2>&1 && return 0
		sleep 1
	done
	"$@" || true
	fail "timeout (${t}s): $what"
}

# ---------------------------------------------------------------- config --
write_config() { # N
	local n=$1 i
	mkdir -p "$D/tandem/disks"
	{
		printf '[cluster]\nname = "tpcmk"\nsecret = "tandem-pcmk-test-secret"\n'
		printf 'state-dir = "%s/tandem/state"\nrun-dir = "/run/tandem"\n\n' "$D"
		for i in $(seq 1 "$n"); do
			printf '[[node]]\nname = "node%d"\nid = %d\naddress = "%s.%d"\n\n' "$i" "$i" "$NET" "$i"
		done
		if [ "$n" = 2 ]; then
			printf '[[node]]\nname = "witness"\nid = 9\naddress = "%s.100"\nwitness = true\n\n' "$NET"
		fi
		printf '[[resource]]\nname = "www"\nallow-two-primaries = true\nsize = "64MiB"\n'
		for i in $(seq 1 "$n"); do
			printf '[resource.on.node%d]\ndisk = "%s/tandem/disks/node%d.img"\n' "$i" "$D" "$i"
		done
	} >"$C"
}

start_witness() {
	ip -n tpcmk-sw addr add "$NET.100/24" dev br0 2>/dev/null
	mkdir -p "$D/tandem/state/witness"
	# Own mount namespace with a private /run (the config's run-dir), in the switch's
	# network namespace: a lock-manager voter outside Pacemaker.
	setsid ip netns exec tpcmk-sw unshare --mount --propagation private \
		sh -c 'mount -t tmpfs tmpfs /run && exec "$0" "$@"' \
		"$TANDEM_BIN_DIR/tandem-lockd" --config "$C" --node witness \
		</dev/null >>"$D/tandem/state/witness/lockd.log" 2>&1 &
	WITNESS_PID=$!
}

uri() { echo "nbd+unix:///www?socket=/run/tandem/node$1/nbd-www.sock"; }

# The administrator's part before Pacemaker takes over (README walk-through, step 2).
prepare_volume() { # N
	local n=$1 i out
	for i in $(seq 1 "$n"); do
		hx "$i" tandemadm --config "$C" create-md www >/dev/null || fail "create-md on node$i"
		hx "$i" tandemadm --config "$C" up www >/dev/null || fail "up on node$i"
	done
	wait_for 30 "www connected everywhere" bash -c "[ \"\$(bash '$H' exec 1 tandemadm --config '$C' status www --json | grep -c '\"Connected\"')\" = $((n - 1)) ]"
	hx 1 tandemadm --config "$C" new-current-uuid --clear-bitmap www >/dev/null || fail "new-current-uuid"
	for i in $(seq 1 "$n"); do
		hx "$i" tandemadm --config "$C" wait-sync www --timeout-s 30 >/dev/null || fail "wait-sync node$i"
	done
	hx 1 tandemadm --config "$C" primary www >/dev/null || fail "primary node1"
	hx 1 mkfs.tandem -q -t tpcmk:www -j "$n" "$(uri 1)" || fail "mkfs.tandem"
	# Does mount.tandem do cluster mounts yet?
	FS_SKIP=""
	mkdir -p "$D/tandem/probe"
	out=$(hx 1 timeout 20 mount.tandem "$(uri 1)" "$D/tandem/probe" -o "node=node1,config=$C" 2>&1)
	if hx 1 mountpoint -q "$D/tandem/probe"; then
		hx 1 umount "$D/tandem/probe"
	else
		case "$out" in
		*'unknown mount option "node='* | *"not wired in"* | *"lock_tandem"*"not supported"* | *"lock_tandem"*"unsupported"*)
			FS_SKIP="mount.tandem cannot do cluster mounts yet: $out"
			;;
		esac
	fi
	hx 1 tandemadm --config "$C" secondary www >/dev/null
	for i in $(seq 1 "$n"); do hx "$i" tandemadm --config "$C" down www >/dev/null; done
}

# ------------------------------------------------------------ ocf-tester --
run_ocf_tester() {
	local a
	if command -v shellcheck >/dev/null; then
		shellcheck "$repo"/ocf-agents/tandem/* "$repo"/ocf-agents/alerts/* "$repo"/ocf-agents/tests/fence_tandem_netns || fail "shellcheck"
		log "shellcheck: agents clean"
	fi
	for a in replicator lockmgr fs; do
		# The DOCTYPE names ra-api-1.dtd relative to the document (as ocf-tester checks).
		"$repo/ocf-agents/tandem/$a" meta-data |
			(cd /usr/share/resource-agents && xmllint --noout --valid -) || fail "$a meta-data does not validate"
	done
	# replicator: node2 holds the peer up so start finds it connected.
	hx 2 tandemadm --config "$C" up www >/dev/null || fail "up node2"
	hx 1 ocf-tester -n vol -o resource=www -o config="$C" "$AGENTS/replicator" >"$D/tandem/ocf-tester-replicator.log" 2>&1 ||
		{ cat "$D/tandem/ocf-tester-replicator.log"; fail "ocf-tester replicator"; }
	log "ocf-tester: replicator passed"
	# promoted-max 2 without allow-two-primaries: OCF_ERR_CONFIGURED (6).
	sed 's/^allow-two-primaries = true/allow-two-primaries = false/' "$C" >"$D/tandem/no2p.toml"
	hx 1 env OCF_ROOT=/usr/lib/ocf OCF_RESKEY_resource=www OCF_RESKEY_config="$D/tandem/no2p.toml" \
		OCF_RESKEY_CRM_meta_promoted_max=2 OCF_RESKEY_CRM_meta_clone_max=2 OCF_RESKEY_CRM_meta_notify=true \
		"$AGENTS/replicator" validate-all >/dev/null 2>&1
	[ $? = 6 ] || fail "replicator: promoted-max=2 without allow-two-primaries is not OCF_ERR_CONFIGURED"
	hx 1 env OCF_ROOT=/usr/lib/ocf OCF_RESKEY_resource=nosuch OCF_RESKEY_config="$C" "$AGENTS/replicator" stop >/dev/null 2>&1 ||
		fail "replicator: stop failed on a configuration error"
	hx 2 tandemadm --config "$C" down www >/dev/null
	# lockmgr: refuses without fencing unless allowed (the harness has stonith-enabled=false);
	# with the witness, node1 alone has a lock-manager majority.
	hx 1 env OCF_ROOT=/usr/lib/ocf OCF_RESKEY_config="$C" "$AGENTS/lockmgr" validate-all >/dev/null 2>&1
	[ $? = 6 ] || fail "lockmgr: starts without fencing and without allow_no_fencing"
	hx 1 ocf-tester -n lm -o config="$C" -o allow_no_fencing=true "$AGENTS/lockmgr" >"$D/tandem/ocf-tester-lockmgr.log" 2>&1 ||
		{ cat "$D/tandem/ocf-tester-lockmgr.log"; fail "ocf-tester lockmgr"; }
	log "ocf-tester: lockmgr passed"
	# fs: on a single-node (lock_nolock) image, since ocf-tester is single-node.
	hx 1 mkfs.tandem -q -t tpcmk:ocft -p lock_nolock -s 32M "$D/tandem/ocftest.img" || fail "mkfs image"
	hx 1 ocf-tester -n fst -o device="$D/tandem/ocftest.img" -o directory="$D/tandem/ocftest-mnt" -o cluster=false \
		"$AGENTS/fs" >"$D/tandem/ocf-tester-fs.log" 2>&1 ||
		{ cat "$D/tandem/ocf-tester-fs.log"; fail "ocf-tester fs"; }
	local e=(env OCF_ROOT=/usr/lib/ocf OCF_RESKEY_device="$D/tandem/ocftest.img" OCF_RESKEY_directory="$D/tandem/ocftest-mnt"
		OCF_RESKEY_cluster=false OCF_RESKEY_CRM_meta_timeout=12000)
	hx 1 "${e[@]}" "$AGENTS/fs" start >/dev/null 2>&1 || fail "fs start"
	local lvl
	for lvl in 10 20; do
		hx 1 "${e[@]}" OCF_CHECK_LEVEL=$lvl "$AGENTS/fs" monitor >/dev/null 2>&1 || fail "fs monitor depth $lvl"
	done
	# A user that ignores SIGTERM keeps the mount busy: stop must still unmount.
	hx 1 sh -c "cd '$D/tandem/ocftest-mnt' && trap '' TERM && exec sleep 600" >/dev/null 2>&1 &
	local busy=$!
	sleep 1
	hx 1 "${e[@]}" "$AGENTS/fs" stop >/dev/null 2>&1 || fail "fs stop with a busy mount"
	hx 1 mountpoint -q "$D/tandem/ocftest-mnt" && fail "fs stop left the mount"
	wait "$busy" 2>/dev/null
	log "ocf-tester: fs passed (depth 10/20 monitors, forced unmount of a busy mount)"
}

# lockmgr's monitor confirms Pacemaker's fencing to the lock manager: tandem-lockctl and
# stonith_admin stubbed (a node the lock manager reports down and unfenced; the fencer's
# history with a fencing before, then after, the agent's start).
check_fence_confirmation() {
	local t fp acks
	t=$(mktemp -d)
	mkdir -p "$t/bin" "$t/run/n1/lockmgr-seen-up"
	cat >"$t/bin/tandem-lockctl" <<'EOS'
#!/bin/sh
case "$*" in
*"status --json"*) printf '{\n  "id": 1,\n  "leader": 1,\n  "voters": [\n    1,\n    2\n  ],\n  "learners": [],\n  "nodes": [\n    {\n      "node": 1,\n      "up": true,\n      "fenced": false,\n      "orphaned_locks": 0\n    },\n    {\n      "node": 2,\n      "up": %s,\n      "fenced": false,\n      "orphaned_locks": 3\n    }\n  ]\n}\n' "${N2_UP:-false}" ;;
*fence-ack*) echo "$*" >>"$ACKS" ;;
esac
EOS
	cat >"$t/bin/stonith_admin" <<'EOS'
#!/bin/sh
echo "<pacemaker-result><list name=\"fencing history\" count=\"1\">"
echo "    <fence_event action=\"reboot\" target=\"n2\" status=\"success\" completed=\"$(date -u -d "@$FENCE_AT" '+%Y-%m-%d %H:%M:%S')Z\"/>"
echo "</list></pacemaker-result>"
EOS
	printf '#!/bin/sh\nwhile :; do sleep 1; done\n' >"$t/bin/tandem-lockd"
	chmod +x "$t"/bin/*
	printf '[cluster]\nname = "x"\nsecret = "stub-secret"\nrun-dir = "%s/run"\nstate-dir = "%s/run"\n[[node]]\nname = "n1"\nid = 1\naddress = "127.0.0.1"\n[[node]]\nname = "n2"\nid = 2\naddress = "127.0.0.2"\n' "$t" "$t" >"$t/c.toml"
	"$t/bin/tandem-lockd" --config "$t/c.toml" --node n1 &
	fp=$!
	echo "$fp" >"$t/run/n1/lockd.pid"
	date -d '-100 sec' +%s >"$t/run/n1/lockmgr-seen-up/started"
	local e=(env ACKS="$t/acks" PATH="$t/bin:$PATH" OCF_ROOT=/usr/lib/ocf OCF_RESKEY_config="$t/c.toml"
		OCF_RESKEY_node=n1 OCF_RESKEY_CRM_meta_interval=10000)
	"${e[@]}" FENCE_AT="$(date -d '-200 sec' +%s)" "$repo/ocf-agents/tandem/lockmgr" monitor >/dev/null 2>&1
	acks=$(cat "$t/acks" 2>/dev/null)
	if [ -z "$acks" ]; then
		"${e[@]}" FENCE_AT="$(date -d '-10 sec' +%s)" "$repo/ocf-agents/tandem/lockmgr" monitor >/dev/null 2>&1
	fi
	acks=${acks:-none}/$(cat "$t/acks" 2>/dev/null)
	# A rebooting fence device: n2 is up again but still holds its old life's orphans; it
	# was last seen up before a fencing that succeeded, so that fencing is confirmed.
	rm -f "$t/acks"
	date -d '-50 sec' +%s >"$t/run/n1/lockmgr-seen-up/2"
	"${e[@]}" N2_UP=true FENCE_AT="$(date -d '-20 sec' +%s)" "$repo/ocf-agents/tandem/lockmgr" monitor >/dev/null 2>&1
	acks=$acks/$(cat "$t/acks" 2>/dev/null)
	kill "$fp" 2>/dev/null
	wait "$fp" 2>/dev/null
	rm -rf "$t"
	case "$acks" in
	"none/"*"fence-ack n2/"*"fence-ack n2") log "lockmgr monitor: fencing older than the daemon ignored, a new fencing confirmed (fence-ack), also for a node already back with orphans" ;;
	*) fail "lockmgr fencing confirmation: got '$acks' (want none, then fence-ack n2, then fence-ack n2 for the node back up)" ;;
	esac
}

# ------------------------------------------------------------ pacemaker --
# check_state NODE_VIA SPEC...: SPEC = resource:role:node1,node2 (role Started, Promoted)
check_py() {
	cat <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
have = set()
for r in root.iter('resource'):
    if r.get('active') != 'true' or r.get('failed') == 'true' or r.get('orphaned') == 'true':
        continue
    rid = r.get('id').split(':')[0]
    for n in r.iter('node'):
        have.add((rid, r.get('role'), n.get('name')))
ok = True
for spec in sys.argv[1:]:
    rid, role, nodes = spec.split(':')
    for n in nodes.split(','):
        if (rid, role, n) not in have:
            ok = False
sys.exit(0 if ok else 1)
EOF
}
state_ok() { # via spec...
	local via=$1
	shift
	hx "$via" crm_mon -1 --output-as=xml 2>/dev/null | python3 -c "$(check_py)" "$@"
}

failcount() { # via resource node
	hx "$1" crm_mon -1 --output-as=xml --include=failcounts 2>/dev/null | python3 -c '
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
n = 0
for node in root.iter("node"):
    if node.get("name") != sys.argv[2]:
        continue
    for rh in node.iter("resource_history"):
        if rh.get("id", "").split(":")[0] == sys.argv[1]:
            n = max(n, int(rh.get("fail-count", "0") or 0))
print(n)' "$2" "$3"
}

node_offline() { # via node
	hx "$1" crm_mon -1 --output-as=xml 2>/dev/null | grep -q "<node name=\"$2\" [^>]*online=\"false\""
}

FS_PID_BEFORE=""
fs_restarted_on_node2() {
	local p
	p=$(hx 2 pgrep -x mount.tandem | sed -n 1p)
	echo "mount.tandem on node2: pid $p (before the lock manager's restart: $FS_PID_BEFORE)"
	[ -n "$p" ] && [ "$p" != "$FS_PID_BEFORE" ] && settled_ok WebFS:Started:node2
}

failed_on() { # resource node
	[ "$(failcount 1 "$1" "$2")" -ge 1 ]
}

nodes_csv() { # list of node numbers -> node1,node2
	local out="" i
	for i in "$@"; do out="${out:+$out,}node$i"; done
	echo "$out"
}

# The README's pcs commands (walk-through), with the test's paths.
apply_recipe() { # N
	local n=$1
	hx 1 sh -ec "
pcs cluster cib $D/tandem/cfg.xml
pcs -f $D/tandem/cfg.xml stonith create fence-nodes fence_tandem_netns switch_dir=$D/power \
    pcmk_host_list=$(nodes_csv $(seq 1 "$n")) op monitor interval=30s
pcs -f $D/tandem/cfg.xml property set stonith-enabled=true
pcs -f $D/tandem/cfg.xml property set no-quorum-policy=freeze
pcs -f $D/tandem/cfg.xml resource create WebData ocf:tandem:replicator resource=www config=$C \
    op monitor interval=29s role=Promoted monitor interval=31s role=Unpromoted
pcs -f $D/tandem/cfg.xml resource promotable WebData promoted-max=$n promoted-node-max=1 \
    clone-max=$n clone-node-max=1 notify=true interleave=true
pcs -f $D/tandem/cfg.xml resource create lockmgr ocf:tandem:lockmgr config=$C \
    op monitor interval=10s
pcs -f $D/tandem/cfg.xml resource clone lockmgr interleave=true
" >"$D/tandem/pcs.log" 2>&1 || {
		cat "$D/tandem/pcs.log"
		fail "pcs (volume, lock manager)"
	}
	if [ -z "$FS_SKIP" ]; then
		hx 1 sh -ec "
pcs -f $D/tandem/cfg.xml resource create WebFS ocf:tandem:fs resource=www directory=$MNT \
    config=$C options=allow_other op monitor interval=20s monitor interval=60s OCF_CHECK_LEVEL=20
pcs -f $D/tandem/cfg.xml resource clone WebFS interleave=true
pcs -f $D/tandem/cfg.xml constraint order promote WebData-clone then start WebFS-clone
pcs -f $D/tandem/cfg.xml constraint colocation add WebFS-clone with Promoted WebData-clone
pcs -f $D/tandem/cfg.xml constraint order lockmgr-clone then WebFS-clone
pcs -f $D/tandem/cfg.xml constraint colocation add WebFS-clone with lockmgr-clone
" >>"$D/tandem/pcs.log" 2>&1 || {
			cat "$D/tandem/pcs.log"
			fail "pcs (filesystem)"
		}
		if [ -n "$NGINX" ]; then
			hx 1 sh -ec "
pcs -f $D/tandem/cfg.xml resource create WebSite ocf:heartbeat:nginx configfile=$D/tandem/nginx.conf \
    httpd=$NGINX op monitor interval=20s
pcs -f $D/tandem/cfg.xml resource clone WebSite interleave=true
pcs -f $D/tandem/cfg.xml constraint order WebFS-clone then WebSite-clone
pcs -f $D/tandem/cfg.xml constraint colocation add WebSite-clone with WebFS-clone
" >>"$D/tandem/pcs.log" 2>&1 || {
				cat "$D/tandem/pcs.log"
				fail "pcs (web server)"
			}
		fi
	fi
	hx 1 pcs cluster cib-push "$D/tandem/cfg.xml" --config >>"$D/tandem/pcs.log" 2>&1 || {
		cat "$D/tandem/pcs.log"
		fail "pcs cluster cib-push"
	}
}

write_nginx_conf() {
	cat >"$D/tandem/nginx.conf" <<EOF
worker_processes 1;
pid /run/nginx-tandem.pid;
error_log /run/nginx-tandem-error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path /run/nginx-body;
    proxy_temp_path /run/nginx-proxy;
    fastcgi_temp_path /run/nginx-fastcgi;
    uwsgi_temp_path /run/nginx-uwsgi;
    scgi_temp_path /run/nginx-scgi;
    server {
        listen 8080;
        root $MNT;
        location /nginx_status { stub_status; }
    }
}
EOF
}

# Everything Started/Promoted on the given nodes.
full_spec() {
	local csv
	csv=$(nodes_csv "$@")
	echo "WebData:Promoted:$csv lockmgr:Started:$csv"
	if [ -z "$FS_SKIP" ]; then
		echo "WebFS:Started:$csv"
		[ -n "$NGINX" ] && echo "WebSite:Started:$csv"
	fi
}

# A file written on node A is read on node B (filesystem), or a block written through A's
# NBD export is read through B's (when the filesystem part is skipped).
check_shared() { # A B tag
	local a=$1 b=$2 tag=$3 got
	if [ -z "$FS_SKIP" ]; then
		fs_op 30 "$a" sh -c "echo '$tag from node$a' > '$MNT/$tag.txt' && sync '$MNT/$tag.txt'" ||
			fail "write $MNT/$tag.txt on node$a: $OP_OUT"
		fs_op 30 "$b" cat "$MNT/$tag.txt" || fail "read $MNT/$tag.txt on node$b: $OP_OUT"
		got=$OP_OUT
		[ "$got" = "$tag from node$a" ] || fail "node$b read '$got' from $tag.txt, node$a wrote '$tag from node$a'"
		if [ -n "$NGINX" ]; then
			got=$(hx "$b" curl -sf -m 30 "http://$NET.$b:8080/$tag.txt") || fail "nginx on node$b does not serve $tag.txt"
			[ "$got" = "$tag from node$a" ] || fail "nginx on node$b served '$got'"
		fi
	else
		local pat=$(((${#tag} * 7 + a) % 200 + 16))
		hx "$a" qemu-io -f raw "$(uri "$a")" -c "write -P $pat 60M 64k" >/dev/null || fail "NBD write on node$a"
		got=$(hx "$b" qemu-io -f raw "$(uri "$b")" -c "read -P $pat 60M 64k" 2>&1) || fail "NBD read on node$b"
		case "$got" in *"verification failed"*) fail "node$b does not read what node$a wrote: $got" ;; esac
	fi
}

fence_history() { # via node -> the fencer's history of node, one line
	hx "$1" stonith_admin --history "$2" 2>/dev/null | tr '\n' ' '
}

fenced_ok() { # via node: a successful fencing of node is in the history
	hx "$1" stonith_admin --history "$2" --output-as=xml 2>/dev/null | grep -q '<fence_event [^>]*status="success"'
}

no_unfenced_down() { # via: the lock manager reports no node down and not fenced
	hx "$1" tandem-lockctl --config "$C" --node "node$1" status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if all(n["up"] or n["fenced"] for n in s["nodes"]) else 1)'
}

lockd_pid() { # node -> pid inside the node's namespace
	hx "$1" cat "/run/tandem/node$1/lockd.pid"
}

round() { # N
	local n=$1 all i victim survivors t got
	all=$(seq 1 "$n" | tr '\n' ' ')
	log "== $n-node cluster"
	kill_cluster
	bash "$H" up "$n" >"$D.up.log" 2>&1 || {
		cat "$D.up.log"
		fail "harness up $n"
	}
	rm -f "$D.up.log"
	rm -rf "$D/tandem"
	write_config "$n"
	[ "$n" = 2 ] && start_witness
	prepare_volume "$n"
	if [ -n "$FS_SKIP" ]; then
		log "SKIP filesystem part: $FS_SKIP"
	fi
	[ "$n" = 2 ] && run_ocf_tester
	NGINX=""
	if [ -z "$FS_SKIP" ] && command -v nginx >/dev/null; then
		NGINX=$(command -v nginx)
		write_nginx_conf
	fi
	apply_recipe "$n"
	# shellcheck disable=SC2046
	wait_for 150 "volume Promoted and clones Started on every node" settled_ok $(full_spec $all)
	if [ -z "$FS_SKIP" ]; then
		log "volume Promoted on every node; lockmgr, fs${NGINX:+ and nginx} clones Started ($(nodes_csv $all))"
	else
		log "volume Promoted on every node; lockmgr clone Started ($(nodes_csv $all)); fs part skipped"
	fi
	for i in $all; do
		t=$(hx 1 crm_attribute -N "node$i" -n master-WebData -l reboot -G -q 2>/dev/null)
		[ "$t" = 10000 ] || fail "promotion score of WebData on node$i is '$t', expected 10000 (UpToDate, every peer known)"
	done
	log "promotion scores: 10000 on every node"
	for i in $all; do
		[ "$i" = 1 ] && continue
		check_shared 1 "$i" "hello$n-$i"
		check_shared "$i" 1 "back$n-$i"
	done
	log "data written on one node is read on the others"

	# Monitor failure: tandem-lockd of node2 killed -9.
	FS_PID_BEFORE=$(hx 2 pgrep -x mount.tandem | sed -n 1p)
	t=$(lockd_pid 2) || fail "no lockd pid on node2"
	hx 2 kill -KILL "$t"
	wait_for 60 "lockmgr monitor failure on node2 recorded" failed_on lockmgr node2
	# shellcheck disable=SC2046
	wait_for 90 "recovery after the monitor failure" settled_ok $(full_spec $all)
	log "monitor failure (tandem-lockd killed on node2) detected and recovered"
	if [ "$n" -gt 2 ] && [ -z "$FS_SKIP" ]; then
		# The filesystem's daemon dies: the mount answers ENOTCONN, the fs monitor fails,
		# Pacemaker unmounts and mounts again. (pgrep runs inside node2's own PID
		# namespace, which holds only processes this test started.)
		# The lock manager's restart restarted the mount too (order constraint): wait for
		# the new daemon, so the one killed is the one Pacemaker monitors.
		wait_for 60 "WebFS restarted on node2 after the lock manager's restart" fs_restarted_on_node2
		t=$(hx 2 pgrep -x mount.tandem | sed -n 1p)
		[ -n "$t" ] || fail "no mount.tandem process on node2"
		hx 2 kill -KILL "$t"
		wait_for 60 "fs monitor failure on node2 recorded" failed_on WebFS node2
		# shellcheck disable=SC2046
		wait_for 90 "recovery after the fs monitor failure" settled_ok $(full_spec $all)
		check_shared 2 1 "after-fs-recovery$n"
		log "monitor failure (mount.tandem killed on node2: ENOTCONN) detected and recovered"
	fi

	# Kill every process of the last node; the others keep serving.
	victim=$n
	survivors=$(seq 1 $((n - 1)) | tr '\n' ' ')
	bash "$H" crash "$victim" >/dev/null 2>&1 || fail "crash node$victim"
	log "node$victim crashed (every process killed)"
	wait_for 60 "Pacemaker sees node$victim offline" node_offline 1 "node$victim"
	# shellcheck disable=SC2046
	wait_for 60 "survivors Promoted/Started, node$victim gone" state_ok 1 $(full_spec $survivors)
	check_shared 1 "$((n - 1))" "during-outage$n"
	[ "$n" -gt 2 ] && check_shared 2 1 "during-outage-b$n"
	log "survivors ($(nodes_csv $survivors)) keep serving"
	# Pacemaker fences the victim through the harness's power switch (fence_tandem_netns:
	# off, then on = boot) and the node boots and rejoins by itself. The lock manager has
	# at least three voters here, so it counts the dead minority node as fenced by itself
	# (the lockmgr agent's fence-ack from the fencer's history is checked with stubs in
	# check_fence_confirmation): no node may stay down and unfenced.
	wait_for 90 "Pacemaker fenced node$victim" fenced_ok 1 "node$victim"
	log "Pacemaker fenced node$victim (stonith history: $(fence_history 1 "node$victim"))"
	wait_for 60 "the lock manager counts node$victim fenced or up again" no_unfenced_down 1
	# Rejoin: the fence's "on" boots the node; Pacemaker restarts everything there; the
	# volume resyncs and is promoted.
	# shellcheck disable=SC2046
	wait_for 150 "node$victim rejoined, Promoted and Started" settled_ok $(full_spec $all)
	hx "$victim" tandemadm --config "$C" status www | grep -q 'disk:UpToDate' || fail "node$victim not UpToDate after rejoin"
	check_shared 1 "$victim" "after-rejoin$n"
	if [ -z "$FS_SKIP" ]; then
		fs_op 30 "$victim" cat "$MNT/during-outage$n.txt" ||
			fail "node$victim cannot read the file written during its outage: $OP_OUT"
	fi
	log "node$victim rejoined, resynced and is Promoted again"

	stop_witness
	kill_cluster
	log "== $n-node cluster: passed"
}

check_fence_confirmation
passed=0
for n in "${sizes[@]}"; do
	round "$n"
	passed=$((passed + 1))
done
if [ -n "${FS_SKIP:-}" ]; then
	log "NOTE: the filesystem clone was skipped: $FS_SKIP"
fi
log "$passed passed, 0 failed"
