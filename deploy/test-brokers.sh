#!/usr/bin/env bash
# RabbitMQ brokers for the test suite beside the host's own (which it never
# touches): RabbitMQ 4.0 from Debian trixie, run from a trixie chroot (its
# packages need trixie's libc), as one node or as a three-node cluster.
#
#   deploy/test-brokers.sh up 4.0        one node on 127.0.0.1:5673
#   deploy/test-brokers.sh up cluster    three nodes on 127.0.0.1:5681-5683
#   deploy/test-brokers.sh env 4.0|cluster
#                                        the environment that points the
#                                        tests at it: eval "$(... env 4.0)"
#   deploy/test-brokers.sh ctl NODE ...  rabbitmqctl of a node (rabbit40,
#                                        rabbit81, rabbit82, rabbit83)
#   deploy/test-brokers.sh down [4.0|cluster]
#   deploy/test-brokers.sh version 4.0   the node's `rabbitmqctl version`
#   deploy/test-brokers.sh kill|freeze|thaw|start NODE
#                                        for failover tests: SIGKILL, SIGSTOP
#                                        or SIGCONT a node's VM, or start it
#                                        again (it rejoins its cluster)
#
# The chroot is built once (debootstrap, about 400 MB) under
# $AMQP_EXEC_TEST_BROKERS (default /var/cache/amqp-exec-test) and reused;
# `up` is fast when it exists and the nodes run. A node that does not start
# is started once more; then `up` fails with the end of its logs (the
# chroot's /var/log/rabbitmq/NODE.out holds what it printed). Needs root.
set -euo pipefail

BASE=${AMQP_EXEC_TEST_BROKERS:-/var/cache/amqp-exec-test}
ROOT=$BASE/trixie
BIN=$BASE/bin
MIRROR=${AMQP_EXEC_TEST_MIRROR:-http://deb.debian.org/debian}
# The chroot's own EPMD, beside the host's on 4369.
EPMD_PORT=4370

say() { echo "test-brokers: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (chroot, mounts)"

# node name -> AMQP port and distribution port.
amqp_port() {
    case $1 in
    rabbit40) echo 5673 ;;
    rabbit81) echo 5681 ;;
    rabbit82) echo 5682 ;;
    rabbit83) echo 5683 ;;
    *) die "unknown node $1" ;;
    esac
}
dist_port() { echo $(($(amqp_port "$1") + 20000)); }

nodes_of() {
    case $1 in
    4.0) echo rabbit40 ;;
    cluster) echo rabbit81 rabbit82 rabbit83 ;;
    *) die "unknown broker '$1' (4.0 or cluster)" ;;
    esac
}

ensure_chroot() {
    if [ -x "$ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ]; then
        return
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        say "installing debootstrap (apt-get)"
        apt-get update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null
    fi
    say "building the trixie chroot with rabbitmq-server in $ROOT (once; a few minutes)"
    mkdir -p "$BASE"
    rm -rf "$ROOT.tmp"
    debootstrap --variant=minbase --include=rabbitmq-server trixie "$ROOT.tmp" "$MIRROR" >"$BASE/debootstrap.log" 2>&1 ||
        die "debootstrap failed; see $BASE/debootstrap.log"
    mv "$ROOT.tmp" "$ROOT"
}

ensure_mounts() {
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
    cp /etc/hosts "$ROOT/etc/hosts"
}

# The chroot's rabbitmq user and group, as numbers (the host may give the
# same numbers to other names).
owner() {
    local uid gid
    uid=$(awk -F: '$1 == "rabbitmq" { print $3 }' "$ROOT/etc/passwd")
    gid=$(awk -F: '$1 == "rabbitmq" { print $3 }' "$ROOT/etc/group")
    echo "$uid:$gid"
}

# Runs a RabbitMQ script of the chroot as its rabbitmq user, for node $1.
in_node() {
    local node=$1 script=$2
    shift 2
    chroot --userspec="$(owner)" "$ROOT" /usr/bin/env -i \
        HOME=/var/lib/rabbitmq LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        ERL_EPMD_PORT=$EPMD_PORT \
        RABBITMQ_NODENAME="$node@localhost" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$(amqp_port "$node")" \
        RABBITMQ_DIST_PORT="$(dist_port "$node")" \
        RABBITMQ_MNESIA_BASE="/var/lib/rabbitmq/$node" \
        RABBITMQ_LOG_BASE="/var/log/rabbitmq/$node" \
        RABBITMQ_PID_FILE="/var/lib/rabbitmq/$node.pid" \
        RABBITMQ_ENABLED_PLUGINS_FILE="/var/lib/rabbitmq/$node.plugins" \
        RABBITMQ_CONFIG_FILE="/var/lib/rabbitmq/$node.conf" \
        "/usr/lib/rabbitmq/bin/$script" "$@"
}

ctl() {
    local node=$1
    shift
    in_node "$node" rabbitmqctl -n "$node@localhost" "$@"
}

# The wrapper that tests run as RABBITMQCTL for a node.
write_wrapper() {
    local node=$1
    mkdir -p "$BIN"
    cat >"$BIN/rabbitmqctl-$node" <<EOF
#!/bin/sh
exec "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" ctl $node "\$@"
EOF
    chmod 755 "$BIN/rabbitmqctl-$node"
}

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# A node runs in the foreground of its own session, its output in
# /var/log/rabbitmq/NODE.out of the chroot: errors from before its logger
# starts (a taken port, say) land there, where `-detached` would drop them.
start_node() {
    local node=$1 port
    port=$(amqp_port "$node")
    write_wrapper "$node"
    if answers "$port" && ctl "$node" status >/dev/null 2>&1; then
        return
    fi
    say "starting $node@localhost on 127.0.0.1:$port"
    : >"$ROOT/var/lib/rabbitmq/$node.plugins"
    # A small config: no disk alarm on a busy test disk; the rest default.
    printf 'disk_free_limit.absolute = 50MB\n' >"$ROOT/var/lib/rabbitmq/$node.conf"
    mkdir -p "$ROOT/var/log/rabbitmq"
    chown -R "$(owner)" "$ROOT/var/lib/rabbitmq" "$ROOT/var/log/rabbitmq"
    setsid bash "$0" _run "$node" >"$ROOT/var/log/rabbitmq/$node.out" 2>&1 </dev/null &
    echo $! >"$BASE/$node.launcher"
}

# The process that runs a node started by start_node, while it runs.
launcher_alive() {
    local pid
    pid=$(cat "$BASE/$1.launcher" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null
}

# Up to 90 s for a node to finish booting; fails at once when its VM exits.
wait_node() {
    local node=$1 i
    for i in $(seq 1 90); do
        if ctl "$node" await_startup --timeout 2 >/dev/null 2>&1; then
            return 0
        fi
        if ! launcher_alive "$node"; then
            say "$node exited while starting"
            return 1
        fi
        sleep 1
    done
    say "$node did not finish starting within 90 s"
    return 1
}

# What a node that did not start left behind, for the CI log.
report_node() {
    local node=$1 port f
    port=$(amqp_port "$node")
    for f in "$ROOT/var/log/rabbitmq/$node/$node@localhost.log" "$ROOT/var/log/rabbitmq/$node.out"; do
        [ -s "$f" ] || continue
        say "--- last lines of $f"
        tail -n 25 "$f" >&2
    done
    say "--- listeners on ports $port and $(dist_port "$node")"
    if command -v ss >/dev/null 2>&1; then
        ss -ltnp "( sport = :$port or sport = :$(dist_port "$node") )" >&2 || true
    fi
    say "--- free disk"
    df -h "$ROOT" >&2 || true
}

# Stops a node's VM however it is: by rabbitmqctl, else by signal.
kill_node() {
    local node=$1 pid
    ctl "$node" stop >/dev/null 2>&1 || true
    pid=$(cat "$ROOT/var/lib/rabbitmq/$node.pid" 2>/dev/null) && kill -KILL "$pid" 2>/dev/null || true
    pid=$(cat "$BASE/$node.launcher" 2>/dev/null) && kill -KILL -- "-$pid" 2>/dev/null || true
    sleep 1
}

# Waits for a started node; one more start after a failed one, then it
# gives up with the node's own words.
settle_node() {
    local node=$1
    wait_node "$node" && return
    report_node "$node"
    say "starting $node once more"
    kill_node "$node"
    start_node "$node"
    wait_node "$node" && return
    report_node "$node"
    die "$node did not start; its log: $ROOT/var/log/rabbitmq/$node"
}

up() {
    ensure_chroot
    ensure_mounts
    local n members
    for n in $(nodes_of "$1"); do start_node "$n"; done
    for n in $(nodes_of "$1"); do settle_node "$n"; done
    if [ "$1" = cluster ]; then
        for n in rabbit82 rabbit83; do
            # Read whole first: `grep -q` stopping early would break the
            # pipe under rabbitmqctl, and pipefail would call that a miss.
            members=$(ctl "$n" cluster_status 2>/dev/null || true)
            if ! grep -q rabbit81@localhost <<<"$members"; then
                say "joining $n to rabbit81"
                ctl "$n" stop_app >/dev/null
                ctl "$n" reset >/dev/null
                ctl "$n" join_cluster rabbit81@localhost >/dev/null
                ctl "$n" start_app >/dev/null
            fi
        done
        ctl rabbit81 await_online_nodes 3 >/dev/null
    fi
    say "$1 is up: $(ctl "$(nodes_of "$1" | cut -d' ' -f1)" version)"
}

down() {
    local n
    for n in $(nodes_of "$1"); do
        if ctl "$n" status >/dev/null 2>&1; then
            say "stopping $n"
            ctl "$n" stop >/dev/null 2>&1 || true
        fi
    done
}

env_of() {
    case $1 in
    4.0)
        echo "export AMQP_URL='amqp://guest:guest@127.0.0.1:5673/%2f'"
        echo "export RABBITMQCTL='$BIN/rabbitmqctl-rabbit40'"
        echo "export AMQP_EXEC_BROKER='4.0'"
        ;;
    cluster)
        echo "export AMQP_URL='amqp://guest:guest@127.0.0.1:5681/%2f'"
        echo "export AMQP_EXEC_CLUSTER_URLS='amqp://guest:guest@127.0.0.1:5681/%2f amqp://guest:guest@127.0.0.1:5682/%2f amqp://guest:guest@127.0.0.1:5683/%2f'"
        echo "export RABBITMQCTL='$BIN/rabbitmqctl-rabbit81'"
        echo "export AMQP_EXEC_CLUSTER_CTL='$BIN/rabbitmqctl-rabbit81 $BIN/rabbitmqctl-rabbit82 $BIN/rabbitmqctl-rabbit83'"
        echo "export AMQP_EXEC_BROKER='cluster'"
        ;;
    *) die "unknown broker '$1' (4.0 or cluster)" ;;
    esac
}

cmd=${1:-}
case $cmd in
up) up "${2:?up 4.0|cluster}" ;;
down)
    if [ -n "${2:-}" ]; then down "$2"; else
        down 4.0
        down cluster
    fi
    ;;
env) env_of "${2:?env 4.0|cluster}" ;;
ctl)
    node=${2:?ctl NODE ARGS}
    shift 2
    ctl "$node" "$@"
    ;;
version) ctl "$(nodes_of "${2:?version 4.0|cluster}" | cut -d' ' -f1)" version ;;
kill | freeze | thaw)
    node=${2:?$cmd NODE}
    pid=$(cat "$ROOT/var/lib/rabbitmq/$node.pid" 2>/dev/null) || die "$node has no pid file"
    case $cmd in
    kill) kill -KILL "$pid" ;;
    freeze) kill -STOP "$pid" ;;
    thaw) kill -CONT "$pid" ;;
    esac
    ;;
start)
    node=${2:?start NODE}
    amqp_port "$node" >/dev/null
    ensure_mounts
    start_node "$node"
    settle_node "$node"
    ;;
_run)
    # start_node's: a node in the foreground, as the chroot's rabbitmq user.
    in_node "${2:?_run NODE}" rabbitmq-server
    ;;
*)
    sed -n '2,24p' "$0" >&2
    exit 2
    ;;
esac
