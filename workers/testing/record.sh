#!/bin/sh
# Test worker: records each run in "$RECORD_DIR/ledger" as
#   <message id> <attempt> <start ns> <end ns> <pid>
# and keeps the body in "$RECORD_DIR/body.<message id>".
# SLEEP (seconds) makes the job take that long; EXIT_CODE sets the exit status.
set -u
dir=${RECORD_DIR:?RECORD_DIR is not set}
id=${AMQP_EXEC_MESSAGE_ID:-none}
start=$(date +%s%N)
cat > "$dir/body.$id"
if [ -n "${SLEEP:-}" ]; then sleep "$SLEEP"; fi
end=$(date +%s%N)
echo "$id ${AMQP_EXEC_ATTEMPT:-?} $start $end $$" >> "$dir/ledger"
exit "${EXIT_CODE:-0}"
