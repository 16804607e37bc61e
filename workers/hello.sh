#!/bin/sh
# Example unit worker for amqp-exec: handles one message and exits.
# The body arrives on stdin; the message's metadata in AMQP_EXEC_* variables.
# Exit 0 acks the message.
body=$(cat)
printf 'hello: message %s attempt %s body: %s\n' \
    "${AMQP_EXEC_MESSAGE_ID:-}" "${AMQP_EXEC_ATTEMPT:-}" "$body"
exit 0
