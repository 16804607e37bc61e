#!/bin/sh
# Example failing worker for amqp-exec: reads its message, complains on
# stderr, and exits with $FAIL_CODE (default 1).
#   FAIL_CODE=1   retried after the backoff delay, dead-lettered after max_attempts
#   FAIL_CODE=75  retried (temporary failure)
#   FAIL_CODE=65  dead-lettered at once (the message itself is bad)
cat >/dev/null
echo "fail: message ${AMQP_EXEC_MESSAGE_ID:-} attempt ${AMQP_EXEC_ATTEMPT:-}: failing with exit code ${FAIL_CODE:-1}" >&2
exit "${FAIL_CODE:-1}"
