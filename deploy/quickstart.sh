#!/usr/bin/env bash
# Quick start: makes sure RabbitMQ runs, builds amqp-exec, publishes five
# example messages to the queue "hello", and runs the supervisor on
# deploy/example.toml until the queue has been idle for 3 seconds.
#
# Run as root on a fresh Debian host (RabbitMQ is installed if missing);
# works from any directory. Exits non-zero if any step fails.
set -euo pipefail

cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
die() {
    echo "quickstart: error: $*" >&2
    exit 1
}

# Messages waiting in a queue, or nothing if the queue does not exist.
queue_messages() {
    rabbitmqctl -q list_queues name messages 2>/dev/null |
        awk -v q="$1" '$1 == q { print $2 }'
}

step "RabbitMQ"
deploy/ensure-rabbitmq.sh

step "Build (cargo build)"
if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME:-}/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "${HOME:-}/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install Rust (https://rustup.rs) and run this script again"
cargo build --quiet
BIN=target/debug/amqp-exec
CONFIG=deploy/example.toml

step "Publish 5 messages to the queue \"hello\""
"$BIN" publish --queue hello --declare --message-id quickstart \
    --body "Hello from the amqp-exec quick start" --count 5

step "Run the supervisor (amqp-exec --config $CONFIG run --exit-when-idle 3s)"
"$BIN" --config "$CONFIG" run --exit-when-idle 3s

step "Queues"
rabbitmqctl -q list_queues name messages | awk 'NR == 1 || $1 ~ /^hello/'

left=$(queue_messages hello)
[ "$left" = 0 ] || die "queue \"hello\" still holds ${left:-?} message(s)"
echo
echo "quickstart: done: the 5 messages were processed by workers/hello.sh"
