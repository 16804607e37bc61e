#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672.
#
# Idempotent. On a fresh Debian host, run as root: it installs the
# rabbitmq-server package if it is missing, starts the broker if it is not
# running (with `rabbitmq-server -detached`; systemd is not needed), and waits
# until the AMQP port accepts connections. Exits non-zero if the broker does
# not come up.
set -euo pipefail

HOST=127.0.0.1
PORT=5672
WAIT_SECS=${RABBITMQ_WAIT_SECS:-90}

say() { echo "ensure-rabbitmq: $*"; }
die() {
    echo "ensure-rabbitmq: error: $*" >&2
    exit 1
}

# True when something accepts TCP connections on the AMQP port.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null
}

is_root() { [ "$(id -u)" -eq 0 ]; }

installed() { command -v rabbitmq-server >/dev/null 2>&1; }

# True when the broker answers: the port is open and, where we may ask the
# node itself (root), it reports its listeners as reachable.
answers() {
    port_open || return 1
    if is_root && command -v rabbitmq-diagnostics >/dev/null 2>&1; then
        timeout 30 rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1 || return 1
    fi
    return 0
}

if ! installed; then
    if port_open; then
        say "rabbitmq-server is not installed, but a broker already listens on $HOST:$PORT; using it"
        exit 0
    fi
    is_root || die "rabbitmq-server is not installed; run this script as root to install it"
    say "installing rabbitmq-server (apt-get)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server
    installed || die "rabbitmq-server is still missing after apt-get install"
fi

if answers; then
    say "RabbitMQ answers on $HOST:$PORT"
    exit 0
fi

is_root || die "RabbitMQ does not answer on $HOST:$PORT; run this script as root to start it"

if pgrep -u rabbitmq -x beam.smp >/dev/null 2>&1; then
    say "a RabbitMQ node is running but does not answer yet; starting its app if stopped"
    timeout 60 rabbitmqctl -q start_app >/dev/null 2>&1 || true
else
    say "starting RabbitMQ (rabbitmq-server -detached)"
    rabbitmq-server -detached || say "rabbitmq-server -detached exited with status $?; waiting anyway"
fi

deadline=$((SECONDS + WAIT_SECS))
while ((SECONDS < deadline)); do
    if timeout 30 rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1 && port_open; then
        say "RabbitMQ is up and answers on $HOST:$PORT"
        exit 0
    fi
    # A node that was still shutting down when we looked has gone: start a new one.
    if ! pgrep -u rabbitmq -x beam.smp >/dev/null 2>&1; then
        say "no RabbitMQ node is running; starting one (rabbitmq-server -detached)"
        rabbitmq-server -detached || say "rabbitmq-server -detached exited with status $?; waiting anyway"
    fi
    sleep 2
done

echo "ensure-rabbitmq: error: RabbitMQ did not start within ${WAIT_SECS}s" >&2
echo "ensure-rabbitmq: see /var/log/rabbitmq/ (startup_log, startup_err, rabbit@*.log)" >&2
exit 1
