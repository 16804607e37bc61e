-- Table read by workers/send-email. The web app inserts a row and publishes
-- {"email_id": <id>} to the queue; the worker claims, sends and marks it.
CREATE TABLE IF NOT EXISTS emails (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    sender      VARCHAR(320)    NOT NULL,
    recipient   VARCHAR(320)    NOT NULL,
    subject     VARCHAR(998)    NOT NULL,
    body        MEDIUMTEXT      NOT NULL,
    created_at  TIMESTAMP(6)    NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    -- Set by the worker that is sending the email; a stale claim expires.
    claimed_at  TIMESTAMP(6)    NULL,
    claim_token VARCHAR(64)     NULL,
    -- Set once the SMTP server accepted the message.
    sent_at     TIMESTAMP(6)    NULL,
    KEY pending (sent_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
