#!/bin/bash
# pcmk-harness.sh - a throw-away 1..3 node corosync + Pacemaker cluster on one machine,
# in network/mount/UTS/IPC/PID namespaces, without systemd, for Tandem's OCF agent tests.
# Adapted from shared/tools/pcmk-sandbox.sh (same commands and design), with Tandem's
# own defaults and two additions:
#   * every node sees $TANDEM_PCMK_BIN (the Tandem binaries plus mkfs/fsck/mount.tandem
#     links, prepared by `up`) at /usr/local/sbin, and a private
#     /usr/lib/ocf/resource.d with provider `tandem` = this repo's ocf-agents/tandem, so
#     the agents run exactly as installed without touching the host's /usr;
#   * `crash NODE` also detaches the node's FUSE mounts (a reboot drops them);
#   * a power switch for fencing: `up` starts a loop on the host (_power_switch) that
#     serves the fence agent fence_tandem_netns (ocf-agents/tests/), which every node
#     sees in /usr/sbin; off = `crash`, on = start the node's stack again. With a
#     stonith device of that agent, Pacemaker itself fences a failed node.
#
# Nodes are node1..nodeN (host names inside their UTS namespaces), eth0 = 10.213.77.N/24
# on a bridge in namespace tpcmk-sw; nothing touches the host's network namespace.
#
# Usage (as root):
#   pcmk-harness.sh up [N]           start an N-node cluster (N=1..3, default 2)
#   pcmk-harness.sh exec NODE CMD..  run CMD inside NODE (node1 or 1)
#   pcmk-harness.sh status           PIDs + crm_mon -1
#   pcmk-harness.sh wait-online [NODE...]
#   pcmk-harness.sh kill NODE [corosync|pacemakerd|all]
#   pcmk-harness.sh crash NODE       SIGKILL every process of NODE, drop its mounts, wipe /run
#   pcmk-harness.sh stop-node NODE | start-node NODE
#   pcmk-harness.sh power-switch stop|start   the fence agent's switch (started by up)
#   pcmk-harness.sh down [--purge]   stop everything this script started (by PID)
#   pcmk-harness.sh logs NODE
#
# Environment: TANDEM_PCMK_DIR (state, default /tmp/tandem-pcmk), TANDEM_PCMK_PREFIX
# (namespace prefix, default tpcmk), TANDEM_PCMK_NET (first 3 octets, default
# 10.213.77), TANDEM_PCMK_TOKEN (corosync token ms, default 1000), TANDEM_BIN_DIR (where
# the Tandem binaries are, default target/debug of this repo), TANDEM_PCMK_DC_DEADTIME.
# stonith-enabled=false is seeded into the initial CIB (no fencing devices); 2-node
# clusters use corosync two_node: 1.

set -u
set -o pipefail

SELF=$(readlink -f "$0")
REPO=$(cd "$(dirname "$SELF")/../.." && pwd)
SANDBOX=${TANDEM_PCMK_DIR:-/tmp/tandem-pcmk}
PREFIX=${TANDEM_PCMK_PREFIX:-tpcmk}
NET=${TANDEM_PCMK_NET:-10.213.77}
CRYPTO=0
DC_DEADTIME=${TANDEM_PCMK_DC_DEADTIME:-5s}
TOKEN=${TANDEM_PCMK_TOKEN:-1000}        # corosync totem token (ms); empty = default
PCSD=0
HACLUSTER_PW=hacluster
CLUSTER_NAME=tandempcmk
TBIN=${TANDEM_BIN_DIR:-$REPO/target/debug}
SWNS="$PREFIX-sw"

PKGS="pacemaker pacemaker-cli-utils corosync pcs resource-agents libxml2-utils iproute2 util-linux procps psmisc"

log()  { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { log "ERROR: $*"; exit 1; }
now()  { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

nodedir()  { echo "$SANDBOX/nodes/node$1"; }
nodens()   { echo "$PREFIX-node$1"; }
# Accept "node2" or "2"
nodenum()  { local n=${1#node}; [[ $n =~ ^[1-9]$ ]] || die "bad node '$1'"; echo "$n"; }
netns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF "$1"; }
pid_alive() { [ -n "${1:-}" ] && [ -d "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
readpid()  { [ -f "$1" ] && cat "$1" 2>/dev/null || true; }
cmdline_of() { tr '\0' ' ' 2>/dev/null < "/proc/$1/cmdline"; }
# PID files are only trusted after checking the process really is ours (guards
# against PID reuse): the node init must run "<this script> _init N" inside the
# node's network namespace; daemons must live in the node init's PID namespace.
holder_pid() {
    local n=$1 p nsf
    p=$(readpid "$(nodedir "$n")/holder.pid")
    pid_alive "$p" || return 1
    [[ "$(cmdline_of "$p")" == *" _init $n " ]] || return 1
    nsf="/run/netns/$(nodens "$n")"
    [ -e "$nsf" ] && [ "$(readlink "/proc/$p/ns/net")" = "net:[$(stat -L -c %i "$nsf")]" ] || return 1
    echo "$p"
}
unshare_pid() {
    local p; p=$(readpid "$(nodedir "$1")/unshare.pid")
    pid_alive "$p" && [[ "$(cmdline_of "$p")" == unshare*" _init $1 " ]] && echo "$p"
}
daemon_pid() {   # daemon_pid N NAME -> host PID of NAME in node N, if running
    local n=$1 d=$2 p h
    p=$(readpid "$(nodedir "$n")/$d.pid")
    pid_alive "$p" || return 1
    h=$(holder_pid "$n") || return 1
    [ "$(readlink "/proc/$p/ns/pid")" = "$(readlink "/proc/$h/ns/pid")" ] || return 1
    echo "$p"
}
num_nodes() { readpid "$SANDBOX/num_nodes"; }

# ---------------------------------------------------------------- packages --
apt_retry() {
    # Other processes may hold the dpkg/apt lock: retry for up to ~10 minutes
    # while the error is a lock error; fail at once on any other error.
    local i out
    for i in $(seq 1 120); do
        out=$(DEBIAN_FRONTEND=noninteractive apt-get "$@" 2>&1) && return 0
        if grep -qiE 'Could not get lock|Unable to acquire the dpkg|Unable to lock' <<<"$out"; then
            sleep 5; continue
        fi
        echo "$out" | tail -20 >&2
        return 1
    done
    return 1
}

cmd_install() {
    local missing=() p
    for p in $PKGS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing: ${missing[*]}"
    apt_retry install -y --no-install-recommends "${missing[@]}" \
        || { apt_retry update && apt_retry install -y --no-install-recommends "${missing[@]}"; } \
        || die "apt-get install failed"
}

# ------------------------------------------------------------ node "init" --
# Runs as PID 1 of a node's new mount/uts/ipc/pid namespaces (inside the
# node's network namespace). Sets up the private filesystem view, then just
# reaps orphans until it receives SIGTERM; its death makes the kernel SIGKILL
# every process left in the node's PID namespace.
cmd__init() {
    local n=$1 nd; nd=$(nodedir "$n")
    set -e
    mount --make-rprivate /
    mount -t sysfs sysfs /sys                    # /sys/class/net of this netns
    mount -t tmpfs -o mode=755,size=64m tmpfs /run
    mkdir -p /run/lock /run/crm /run/resource-agents /run/user /run/pcsd
    chmod 1777 /run/lock; chmod 1755 /run/resource-agents
    chown hacluster:haclient /run/crm; chmod 750 /run/crm
    ln -s /dev/shm /run/shm
    mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm
    mount --bind "$nd/etc/corosync"   /etc/corosync
    mount --bind "$nd/etc/hosts"      /etc/hosts
    mount --bind "$nd/lib/corosync"   /var/lib/corosync
    mount --bind "$nd/lib/pacemaker"  /var/lib/pacemaker
    mount --bind "$nd/log/pacemaker"  /var/log/pacemaker
    mount --bind "$nd/log/corosync"   /var/log/corosync
    mkdir -p /var/lib/pcsd && mount --bind "$nd/lib/pcsd" /var/lib/pcsd
    if [ -f "$SANDBOX/shadow" ]; then           # only with PCMK_SANDBOX_PCSD=1
        mount --bind "$SANDBOX/shadow" /etc/shadow
        mount --bind "$nd/log/pcsd" /var/log/pcsd
    fi
    mount --bind "$SANDBOX/sbin"        /usr/local/sbin
    # The harness's fence agent next to the host's (pacemaker-fenced looks in /usr/sbin).
    mount -t overlay overlay -o lowerdir="$SANDBOX/fence-agents":/usr/sbin /usr/sbin
    # Host providers (heartbeat, pacemaker, ...) on their mount points, then the whole tree.
    local pd
    for pd in "$SANDBOX"/resource.d/*; do
        [ "$(basename "$pd")" = tandem ] && continue
        mount --bind "/usr/lib/ocf/resource.d/$(basename "$pd")" "$pd"
    done
    mount --bind "$REPO/ocf-agents/tandem" "$SANDBOX/resource.d/tandem"
    mount --rbind "$SANDBOX/resource.d" /usr/lib/ocf/resource.d
    hostname "node$n"
    set +e
    echo ready > /run/sandbox-ready
    trap 'exit 0' TERM INT
    # bash reaps adopted orphans from its SIGCHLD handler while in `wait`
    while :; do sleep 3600 & wait $!; done
}

# Run a command inside node N's namespaces.
node_exec() {
    local n=$1; shift
    local h; h=$(holder_pid "$n") || die "node$n is not running"
    nsenter --target "$h" --mount --uts --ipc --net --pid -- "$@"
}

# Map a PID as seen inside node N's PID namespace to the host PID.
host_pid_of() {
    local n=$1 nspid=$2 h p nsref
    h=$(holder_pid "$n") || return 1
    nsref=$(readlink "/proc/$h/ns/pid")
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$(readlink "/proc/$p/ns/pid" 2>/dev/null)" = "$nsref" ] || continue
        if [ "$(awk '/^NSpid:/{print $NF}' "/proc/$p/status" 2>/dev/null)" = "$nspid" ]; then
            echo "$p"; return 0
        fi
    done
    return 1
}

# All host PIDs living in node N's PID namespace (including its init).
node_pids() {
    local n=$1 h p nsref
    h=$(holder_pid "$n") || return 0
    nsref=$(readlink "/proc/$h/ns/pid")
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$(readlink "/proc/$p/ns/pid" 2>/dev/null)" = "$nsref" ] && echo "$p"
    done
}

# Start a daemon inside node N, detached (reparented to the node's init);
# prints its host PID.
start_daemon() {
    local n=$1 name=$2; shift 2
    local nspid hp i
    # Clean, systemd-like environment (the caller's PATH may contain e.g.
    # pyenv shims that agents calling `python3` would otherwise pick up);
    # PCMK_* / HA_* variables are passed through (e.g. PCMK_debug=yes).
    local envv=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
    local v
    for v in $(compgen -e); do
        case $v in PCMK_*|HA_*) envv+=("$v=${!v}") ;; esac
    done
    nspid=$(node_exec "$n" env -i "${envv[@]}" /bin/sh -c '
        name=$1; shift
        "$@" </dev/null >>/var/log/corosync/$name.stdout 2>&1 &
        echo $!' sh "$name" "$@") || return 1
    for i in 1 2 3 4 5 6 7 8 9 10; do
        hp=$(host_pid_of "$n" "$nspid") && { echo "$hp"; return 0; }
        sleep 0.1
    done
    return 1
}

# --------------------------------------------------------------- network --
net_up() {
    local N=$1 i ns
    netns_exists "$SWNS" || ip netns add "$SWNS"
    ip -n "$SWNS" link set lo up
    ip -n "$SWNS" link show br0 >/dev/null 2>&1 || ip -n "$SWNS" link add br0 type bridge
    ip -n "$SWNS" link set br0 up
    for i in $(seq 1 "$N"); do
        ns=$(nodens "$i")
        netns_exists "$ns" || ip netns add "$ns"
        ip -n "$ns" link set lo up
        if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
            ip -n "$SWNS" link add "vport$i" type veth peer name eth0 netns "$ns"
            ip -n "$SWNS" link set "vport$i" master br0 up
            ip -n "$ns" addr add "$NET.$i/24" dev eth0
        fi
        ip -n "$ns" link set eth0 up
    done
}

net_down() {
    local ns p
    for ns in "$SWNS" $(nodens 1) $(nodens 2) $(nodens 3) $(nodens 4) $(nodens 5); do
        netns_exists "$ns" || continue
        # Anything still living in a namespace we created is ours: kill by PID.
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null || log "could not delete netns $ns"
    done
}

# ----------------------------------------------------------------- config --
write_corosync_conf() {
    local N=$1 f=$2 i
    {
        echo "totem {"
        echo "    version: 2"
        echo "    cluster_name: $CLUSTER_NAME"
        echo "    transport: knet"
        [ -n "$TOKEN" ] && echo "    token: $TOKEN"
        if [ "$CRYPTO" = 1 ]; then
            echo "    crypto_cipher: aes256"; echo "    crypto_hash: sha256"
        else
            echo "    crypto_cipher: none";   echo "    crypto_hash: none"
        fi
        echo "}"
        echo "nodelist {"
        for i in $(seq 1 "$N"); do
            printf '    node {\n        ring0_addr: %s\n        name: node%s\n        nodeid: %s\n    }\n' \
                "$NET.$i" "$i" "$i"
        done
        echo "}"
        echo "quorum {"
        echo "    provider: corosync_votequorum"
        [ "$N" = 2 ] && echo "    two_node: 1"
        echo "}"
        echo "logging {"
        echo "    to_logfile: yes"
        echo "    logfile: /var/log/corosync/corosync.log"
        echo "    to_stderr: no"
        echo "    to_syslog: no"
        echo "    timestamp: on"
        echo "}"
    } > "$f"
}

prepare_node_dirs() {
    local N=$1 i nd seed
    seed="$SANDBOX/cib-seed.xml"
    # Initial CIB: no fencing, short DC dead time. No .sig file is needed:
    # pacemaker-based only warns "No on-disk digest present" and accepts it.
    cibadmin --empty > "$seed"
    CIB_file="$seed" crm_attribute -t crm_config -n stonith-enabled -v false
    CIB_file="$seed" crm_attribute -t crm_config -n dc-deadtime -v "$DC_DEADTIME"
    CIB_file="$seed" crm_attribute -t crm_config -n cluster-name -v "$CLUSTER_NAME"
    write_corosync_conf "$N" "$SANDBOX/corosync.conf"
    if [ "$CRYPTO" = 1 ]; then
        corosync-keygen -l -k "$SANDBOX/authkey" >/dev/null 2>&1 \
            || dd if=/dev/urandom of="$SANDBOX/authkey" bs=256 count=1 status=none
        chmod 400 "$SANDBOX/authkey"
    fi
    rm -rf "$SANDBOX/nodes" "$SANDBOX/shadow" "$SANDBOX/sbin" "$SANDBOX/resource.d" \
        "$SANDBOX/fence-agents" "$SANDBOX/power"
    # What every node sees at /usr/local/sbin and /usr/lib/ocf/resource.d.
    mkdir -p "$SANDBOX/sbin" "$SANDBOX/resource.d" "$SANDBOX/fence-agents"
    install -m 755 "$REPO/ocf-agents/tests/fence_tandem_netns" "$SANDBOX/fence-agents/"
    local b
    for b in tandem-replicatord tandemadm tandem-lockd tandem-lockctl tandemfs; do
        [ -x "$TBIN/$b" ] || die "$TBIN/$b is missing: cargo build --workspace --bins first"
        ln -s "$TBIN/$b" "$SANDBOX/sbin/$b"
    done
    for b in mkfs fsck mount; do ln -s tandemfs "$SANDBOX/sbin/$b.tandem"; done
    for b in /usr/lib/ocf/resource.d/*; do      # mount points, bound in each node's init
        [ -d "$b" ] && mkdir -p "$SANDBOX/resource.d/$(basename "$b")"
    done
    mkdir -p "$SANDBOX/resource.d/tandem"
    if [ "$PCSD" = 1 ]; then
        # Private copy of /etc/shadow with a known hacluster password (PAM
        # login for `pcs host auth`), bind-mounted over /etc/shadow in nodes.
        local hash; hash=$(openssl passwd -6 "$HACLUSTER_PW")
        awk -F: -v OFS=: -v h="$hash" '$1=="hacluster"{$2=h}1' /etc/shadow > "$SANDBOX/shadow"
        chown root:shadow "$SANDBOX/shadow"; chmod 640 "$SANDBOX/shadow"
        mkdir -p /var/log/pcsd            # mount point (pcsd would create it anyway)
    fi
    for i in $(seq 1 "$N"); do
        nd=$(nodedir "$i")
        mkdir -p "$nd/log/pcsd"
        if [ "$PCSD" = 1 ]; then          # pre-made cert: pcsd skips generating one
            mkdir -p "$nd/lib/pcsd"
            openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=node$i" \
                -keyout "$nd/lib/pcsd/pcsd.key" -out "$nd/lib/pcsd/pcsd.crt" >/dev/null 2>&1
            chmod 600 "$nd/lib/pcsd/pcsd.key" "$nd/lib/pcsd/pcsd.crt"
        fi
        mkdir -p "$nd"/etc/corosync/uidgid.d "$nd"/lib/corosync "$nd"/lib/pcsd \
                 "$nd"/lib/pacemaker/{cib,pengine,blackbox,cores,bundles} \
                 "$nd"/log/pacemaker/bundles "$nd"/log/corosync
        chown -R hacluster:haclient "$nd/lib/pacemaker" "$nd/log/pacemaker"
        chmod 750 "$nd"/lib/pacemaker/{cib,pengine,blackbox,cores}
        chmod 770 "$nd/log/pacemaker"
        cp "$SANDBOX/corosync.conf" "$nd/etc/corosync/corosync.conf"
        [ "$CRYPTO" = 1 ] && install -m 400 "$SANDBOX/authkey" "$nd/etc/corosync/authkey"
        install -o hacluster -g haclient -m 600 "$seed" "$nd/lib/pacemaker/cib/cib.xml"
        {
            echo "127.0.0.1 localhost"
            echo "::1 localhost ip6-localhost ip6-loopback"
            for j in $(seq 1 "$N"); do echo "$NET.$j node$j"; done
        } > "$nd/etc/hosts"
    done
}

# ------------------------------------------------------------ power switch --
# The fence agent's other end (see ocf-agents/tests/fence_tandem_netns). Requests are
# files $SANDBOX/power/ID.req holding "off N", "on N" or "status N"; the answer goes to
# ID.res ("ok", "on", "off" or "error: ..."). $SANDBOX/power/alive is touched every loop.
cmd__power_switch() {
    local dir="$SANDBOX/power" f id verb n ans
    trap 'exit 0' TERM INT
    while :; do
        touch "$dir/alive"
        for f in "$dir"/*.req; do
            [ -e "$f" ] || continue
            id=${f%.req}
            read -r verb n < "$f" || true
            rm -f "$f"
            if ! [[ ${n:-} =~ ^[1-9]$ ]] || ! [ -d "$(nodedir "$n")" ]; then
                ans="error: no node '${n:-}'"
            else
                case $verb in
                    off)
                        if ! holder_pid "$n" >/dev/null; then
                            ans=ok      # its namespaces are gone: off
                        else
                            ans=$(switch_run crash "$n")
                        fi ;;
                    on) ans=$(switch_run _power_on "$n") ;;
                    status)
                        if daemon_pid "$n" corosync >/dev/null; then ans=on; else ans=off; fi ;;
                    *) ans="error: unknown request '$verb'" ;;
                esac
            fi
            log "power switch: $verb node${n:-?}: $ans" 2>>"$dir/switch.log"
            echo "$ans" > "$id.tmp" && mv "$id.tmp" "$id.res"
        done
        sleep 0.2
    done
}

# switch_run CMD N: this script's CMD for node N, logged; prints "ok" or the error.
switch_run() {
    if bash "$SELF" "$1" "$2" >>"$SANDBOX/power/switch.log" 2>&1; then
        echo ok
    else
        echo "error: $1 node$2 failed"
    fi
}

switch_pid() {
    local p; p=$(readpid "$SANDBOX/power.pid")
    pid_alive "$p" && [[ "$(cmdline_of "$p")" == *" _power_switch"* ]] && echo "$p"
}

start_power_switch() {
    local N=$1
    mkdir -p "$SANDBOX/power"
    seq 1 "$N" > "$SANDBOX/power/nodes"
    setsid /bin/bash "$SELF" _power_switch </dev/null >>"$SANDBOX/power/switch.log" 2>&1 &
    echo $! > "$SANDBOX/power.pid"
}

stop_power_switch() {
    local p
    p=$(switch_pid) && kill -TERM "$p"
    rm -f "$SANDBOX/power.pid"
}

# ------------------------------------------------------------ node control --
start_holder() {
    local n=$1 nd up h i
    nd=$(nodedir "$n")
    # unshare --kill-child: if the unshare parent dies, the node init dies too.
    setsid nsenter --net="/run/netns/$(nodens "$n")" -- \
        unshare --mount --uts --ipc --pid --fork --mount-proc --propagation private \
        --kill-child -- /bin/bash "$SELF" _init "$n" \
        </dev/null >>"$nd/init.out" 2>&1 &
    up=$!
    echo "$up" > "$nd/unshare.pid"
    for i in $(seq 1 50); do
        # the node init is the (only) child of the unshare process
        h=$(cat /proc/"$up"/task/*/children 2>/dev/null | awk '{print $1}')
        if [ -n "$h" ] && [ -f "/proc/$h/root/run/sandbox-ready" ]; then
            echo "$h" > "$nd/holder.pid"; return 0
        fi
        pid_alive "$up" || break
        sleep 0.1
    done
    cat "$nd/init.out" >&2
    die "node$n: namespace init did not come up"
}

start_stack() {
    local n=$1 nd p
    nd=$(nodedir "$n")
    if ! daemon_pid "$n" corosync >/dev/null; then
        p=$(start_daemon "$n" corosync corosync -f) || die "node$n: corosync failed to start"
        echo "$p" > "$nd/corosync.pid"
    fi
    if ! daemon_pid "$n" pacemakerd >/dev/null; then
        # wait until corosync answers locally before starting pacemaker
        wait_for 30 "node$n corosync IPC" node_exec "$n" corosync-cmapctl -g totem.cluster_name \
            || { tail -20 "$nd/log/corosync/corosync.log" >&2; die "node$n: corosync not answering"; }
        p=$(start_daemon "$n" pacemakerd pacemakerd) || die "node$n: pacemakerd failed to start"
        echo "$p" > "$nd/pacemakerd.pid"
    fi
    [ "${2:-}" = nopcsd ] || start_pcsd "$n"
}

start_pcsd() {   # only when the sandbox was created with PCMK_SANDBOX_PCSD=1
    local n=$1 nd p; nd=$(nodedir "$n")
    if [ -f "$SANDBOX/shadow" ]; then
        if ! daemon_pid "$n" pcsd-ruby >/dev/null; then
            p=$(start_daemon "$n" pcsd-ruby /usr/share/pcsd/pcsd) || die "node$n: pcsd-ruby failed"
            echo "$p" > "$nd/pcsd-ruby.pid"
        fi
        if ! daemon_pid "$n" pcsd >/dev/null; then
            p=$(start_daemon "$n" pcsd /usr/sbin/pcsd) || die "node$n: pcsd failed"
            echo "$p" > "$nd/pcsd.pid"
        fi
    fi
}

pcsd_listening() { node_exec "$1" ss -ltnH 'sport = :2224' 2>/dev/null | grep -q LISTEN; }

pcsd_auth_all() {
    local N=$1 i t0; t0=$(now)
    for i in $(seq 1 "$N"); do
        wait_for 120 "node$i pcsd on :2224" pcsd_listening "$i" || die "node$i: pcsd not listening"
    done
    for i in $(seq 1 "$N"); do
        node_exec "$i" pcs host auth $(seq -f 'node%g' -s ' ' 1 "$N") \
            -u hacluster -p "$HACLUSTER_PW" >/dev/null || die "node$i: pcs host auth failed"
    done
    log "pcsd running and authenticated on all nodes ($(elapsed "$t0")s)"
}

# stop_stack N [kill-wait-seconds]: graceful stop by PID
stop_stack() {
    local n=$1 tmo=${2:-90} nd p
    local d
    nd=$(nodedir "$n")
    for d in pcsd pcsd-ruby pacemakerd corosync; do
        if p=$(daemon_pid "$n" "$d"); then
            kill -TERM "$p"
            wait_for "$tmo" "node$n $d exit" bash -c "! [ -d /proc/$p ] || grep -q '^State:.*Z' /proc/$p/status" \
                || { log "node$n: $d did not stop, SIGKILL"; kill -KILL "$p" 2>/dev/null; }
        fi
        rm -f "$nd/$d.pid"
    done
}

wait_for() {   # wait_for SECONDS DESCRIPTION CMD...
    local t=$1 what=$2 end; shift 2
    end=$(( $(date +%s) + t ))
    while [ "$(date +%s)" -lt "$end" ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.3
    done
    log "timeout (${t}s) waiting for $what"
    return 1
}

# true when crm_mon on node $1 reports all of nodes $2.. online and a DC exists
crm_online() {
    local via=$1; shift
    local xml n
    xml=$(node_exec "$via" crm_mon -1 --output-as=xml 2>/dev/null) || return 1
    grep -q '<current_dc present="true"' <<<"$xml" || return 1
    for n in "$@"; do
        grep -q "<node name=\"node$n\" [^>]*online=\"true\"" <<<"$xml" || return 1
    done
}

members_ok() {   # corosync on node $1 sees $2 members
    node_exec "$1" corosync-quorumtool -s 2>/dev/null | grep -Eq "^Nodes:[[:space:]]+$2\$"
}

healthy() {
    local N=$1 i
    for i in $(seq 1 "$N"); do
        holder_pid "$i" >/dev/null || return 1
        daemon_pid "$i" corosync >/dev/null || return 1
        daemon_pid "$i" pacemakerd >/dev/null || return 1
        if [ "$PCSD" = 1 ]; then daemon_pid "$i" pcsd >/dev/null || return 1; fi
    done
    crm_online 1 $(seq 1 "$N")
}

# ------------------------------------------------------------- commands --
cmd_up() {
    local N=${1:-2} t0 i cur
    [[ $N =~ ^[1-3]$ ]] || die "N must be 1..3"
    [ "$(id -u)" = 0 ] || die "must run as root"
    t0=$(now)
    cmd_install
    cur=$(num_nodes)
    local want="N=$N CRYPTO=$CRYPTO TOKEN=$TOKEN PCSD=$PCSD DC_DEADTIME=$DC_DEADTIME NET=$NET"
    if [ -n "$cur" ]; then
        if [ "$cur" = "$N" ] && [ "$(cat "$SANDBOX/config" 2>/dev/null)" = "$want" ] && healthy "$N"; then
            switch_pid >/dev/null || start_power_switch "$N"
            log "cluster with $N node(s) already up and healthy"; cmd_status; return 0
        fi
        log "existing sandbox ($(cat "$SANDBOX/config" 2>/dev/null)) is not what was asked or not healthy: tearing down"
        cmd_down
    else
        net_down   # leftovers from an unclean run
    fi
    mkdir -p "$SANDBOX"
    prepare_node_dirs "$N"
    echo "$N" > "$SANDBOX/num_nodes"
    echo "$want" > "$SANDBOX/config"
    net_up "$N"
    for i in $(seq 1 "$N"); do start_holder "$i"; done
    start_power_switch "$N"
    log "namespaces ready after $(elapsed "$t0")s"
    # pcsd (if wanted) only after the cluster is up: it is CPU-hungry at start
    for i in $(seq 1 "$N"); do start_stack "$i" nopcsd; done
    wait_for 60 "corosync membership of $N" members_ok 1 "$N" \
        || die "corosync did not form a $N-node membership (see $(nodedir 1)/log/corosync/corosync.log)"
    log "corosync membership of $N formed after $(elapsed "$t0")s"
    wait_for 120 "pacemaker: all nodes online" crm_online 1 $(seq 1 "$N") \
        || die "pacemaker nodes did not come online (see $(nodedir 1)/log/pacemaker/pacemaker.log)"
    if [ "$PCSD" = 1 ]; then
        for i in $(seq 1 "$N"); do start_pcsd "$i"; done
        pcsd_auth_all "$N"
    fi
    log "cluster up: $N node(s) online after $(elapsed "$t0")s"
    node_exec 1 crm_mon -1
}

cmd_down() {
    local purge=${1:-} i N t0
    t0=$(now)
    N=$(num_nodes); N=${N:-3}
    # 0. no fencing meanwhile: a fence's "on" would boot a node being stopped
    stop_power_switch
    # 1. graceful pacemaker shutdown on all nodes in parallel (by PID)
    for i in $(seq 1 "$N"); do
        p=$(daemon_pid "$i" pacemakerd) && kill -TERM "$p"
    done
    for i in $(seq 1 "$N"); do stop_stack "$i" 90; done
    # 2. kill the node inits; the kernel then kills anything left per node
    for i in $(seq 1 "$N"); do
        local nd h up; nd=$(nodedir "$i")
        h=$(holder_pid "$i") && kill -TERM "$h"
        if up=$(unshare_pid "$i"); then
            wait_for 10 "node$i init exit" bash -c "! [ -d /proc/$up ]" || kill -KILL "$up" 2>/dev/null
        fi
        rm -f "$nd/holder.pid" "$nd/unshare.pid"
    done
    # 3. network namespaces (also kills by PID anything still inside them)
    net_down
    rm -f "$SANDBOX/num_nodes" "$SANDBOX/config"
    [ "$purge" = "--purge" ] && rm -rf "$SANDBOX"
    log "down after $(elapsed "$t0")s"
}

cmd_status() {
    local N i nd d p
    N=$(num_nodes)
    [ -n "$N" ] || { echo "sandbox not up"; return 1; }
    for i in $(seq 1 "$N"); do
        nd=$(nodedir "$i")
        printf 'node%s: init=%s' "$i" "$(holder_pid "$i" || echo DEAD)"
        for d in corosync pacemakerd pcsd; do
            [ "$d" = pcsd ] && [ ! -f "$SANDBOX/shadow" ] && continue
            if p=$(daemon_pid "$i" "$d"); then printf ' %s=%s' "$d" "$p"; else printf ' %s=DOWN' "$d"; fi
        done
        echo
    done
    # first node whose CIB answers
    for i in $(seq 1 "$N"); do
        if node_exec "$i" cibadmin -Q -l >/dev/null 2>&1; then
            echo "--- crm_mon -1 on node$i"
            node_exec "$i" crm_mon -1
            return 0
        fi
    done
    echo "--- no node's CIB is answering"
}

# crash NODE: like pulling the power cord: SIGKILL every process of the node
# (its namespaces stay), then wipe its /run and /dev/shm contents as a reboot
# would. Bring it back with start-node.
cmd_crash() {
    local n nd h p; n=$(nodenum "$1"); nd=$(nodedir "$n")
    h=$(holder_pid "$n") || die "node$n not running"
    for p in $(node_pids "$n"); do
        [ "$p" = "$h" ] || kill -KILL "$p" 2>/dev/null
    done
    rm -f "$nd/corosync.pid" "$nd/pacemakerd.pid" "$nd/pcsd.pid" "$nd/pcsd-ruby.pid"
    sleep 0.2
    # A reboot drops the node's mounts: detach its FUSE mounts (their daemons are dead).
    node_exec "$n" /bin/sh -c 'awk '"'"'$3 ~ /^fuse/ {print $2}'"'"' /proc/self/mounts | while read -r m; do umount -l "$m"; done; true'
    node_exec "$n" /bin/sh -c 'rm -rf /run/resource-agents/* /run/crm/* /run/tandem /dev/shm/* /run/corosync.pid 2>/dev/null; true'
    log "node$n crashed (all its processes SIGKILLed)"
}

cmd_kill() {
    local n what=${2:-corosync} nd p d
    n=$(nodenum "$1"); nd=$(nodedir "$n")
    case $what in
        corosync|pacemakerd) set -- "$what" ;;
        all) set -- pacemakerd corosync ;;
        *) die "kill: corosync|pacemakerd|all" ;;
    esac
    for d in "$@"; do
        p=$(daemon_pid "$n" "$d") && { kill -KILL "$p"; log "node$n: SIGKILL $d ($p)"; }
    done
}

cmd_stop_node()  { local n; n=$(nodenum "$1"); stop_stack "$n" 90; }
# The power switch's "on": like start-node without waiting to be online (a booting
# machine does not wait for the cluster either).
cmd__power_on() {
    local n; n=$(nodenum "$1")
    start_node_stack "$n"
}
cmd_start_node() {
    local n; n=$(nodenum "$1")
    start_node_stack "$n"
    wait_for 120 "node$n online" crm_online "$n" "$n"
}
start_node_stack() {
    local n=$1 nd; nd=$(nodedir "$n")
    holder_pid "$n" >/dev/null || die "node$n namespaces are gone; run down + up"
    # If pacemakerd died with corosync, its children may linger: stop them.
    if ! daemon_pid "$n" pacemakerd >/dev/null; then
        local p c
        for p in $(node_pids "$n"); do
            [ "$p" = "$(holder_pid "$n")" ] && continue
            c=$(cmdline_of "$p")
            case $c in */pacemaker-*|pacemakerd*) kill -KILL "$p" 2>/dev/null ;; esac
        done
    fi
    start_stack "$n"
}

case ${1:-} in
    install)     cmd_install ;;
    up)          shift; cmd_up "$@" ;;
    down)        shift; cmd_down "$@" ;;
    status)      cmd_status ;;
    exec)        shift; n=$(nodenum "${1:?node}"); shift; node_exec "$n" "$@" ;;
    shell)       n=$(nodenum "${2:?node}"); node_exec "$n" env PS1="[node$n \\W]# " bash --norc -i ;;
    wait-online) shift; N=$(num_nodes); if [ $# -eq 0 ]; then set -- $(seq 1 "$N"); fi
                 nodes=(); for a in "$@"; do nodes+=("$(nodenum "$a")"); done
                 via=""; for i in $(seq 1 "$N"); do daemon_pid "$i" pacemakerd >/dev/null && { via=$i; break; }; done
                 wait_for 120 "nodes ${nodes[*]} online" crm_online "$via" "${nodes[@]}" ;;
    kill)        shift; cmd_kill "$@" ;;
    crash)       cmd_crash "${2:?node}" ;;
    stop-node)   cmd_stop_node "${2:?node}" ;;
    start-node)  cmd_start_node "${2:?node}" ;;
    power-switch) case ${2:-} in
                     stop) stop_power_switch ;;
                     start) N=$(num_nodes); [ -n "$N" ] || die "sandbox not up"; switch_pid >/dev/null || start_power_switch "$N" ;;
                     *) die "power-switch start|stop" ;;
                 esac ;;
    logs)        nd=$(nodedir "$(nodenum "${2:?node}")"); ls -1 "$nd"/log/*/*.log "$nd"/log/corosync/*.stdout "$nd"/init.out 2>/dev/null ;;
    _init)       cmd__init "$2" ;;
    _power_switch) cmd__power_switch ;;
    _power_on)   cmd__power_on "$2" ;;
    *)           sed -n '2,/^$/p' "$SELF" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
