//! send-email: an amqp-exec unit worker that sends one email stored in
//! MySQL/MariaDB.
//!
//! Reads `{"email_id": N}` on stdin, opens its own database connection from
//! `DATABASE_URL`, claims the row, sends it over SMTP to `SMTP_URL`, marks it
//! sent, and exits. Nothing outlives the process: no pooled connection can go
//! stale overnight or leak.
//!
//! Exit statuses (amqp-exec turns them into ack, retry or dead letter):
//! - 0: sent, or already sent earlier (idempotent);
//! - 65 (EX_DATAERR): malformed body, unknown id, bad address, SMTP 5xx;
//! - 75 (EX_TEMPFAIL): database or SMTP unreachable, connection lost, SMTP 4xx,
//!   or another worker is sending the same email right now;
//! - 78 (EX_CONFIG): `DATABASE_URL` or `SMTP_URL` missing or invalid.
//!
//! Idempotency: a conditional `UPDATE` claims the row, so one worker wins a
//! race. The claim token is the AMQP message id (`AMQP_EXEC_MESSAGE_ID`), so
//! a retry of the same message takes its own claim back at once, while another
//! message for the same email waits. The row is marked sent after the SMTP
//! server accepted the message, retrying on fresh connections if the first
//! one was lost meanwhile. A claim older than `SEND_EMAIL_CLAIM_TIMEOUT`
//! seconds (default 300; keep it above the queue's `timeout`) is taken to
//! belong to a worker that died. Every message carries the Message-ID
//! `<email-N@amqp-exec>` so that receivers can spot a resend.
//!
//! Errors are one line on stderr; the database password never appears.

use lettre::message::header::ContentType;
use lettre::{Message, SmtpTransport, Transport};
use mysql::prelude::Queryable;
use mysql::{Conn, Opts, OptsBuilder};
use serde::Deserialize;
use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

enum Failure {
    /// Try again later (75).
    Temporary(String),
    /// The message itself is bad (65).
    Permanent(String),
    /// The worker is misconfigured (78).
    Config(String),
}

use Failure::{Config, Permanent, Temporary};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Job {
    email_id: u64,
}

fn main() -> ExitCode {
    match run() {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(Temporary(m)) => {
            eprintln!("send-email: temporary failure: {m}");
            ExitCode::from(75)
        }
        Err(Permanent(m)) => {
            eprintln!("send-email: permanent failure: {m}");
            ExitCode::from(65)
        }
        Err(Config(m)) => {
            eprintln!("send-email: configuration error: {m}");
            ExitCode::from(78)
        }
    }
}

fn run() -> Result<String, Failure> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| Temporary(format!("cannot read stdin: {e}")))?;
    let job: Job = serde_json::from_slice(&input).map_err(|e| {
        Permanent(format!(
            "malformed body, expected {{\"email_id\": N}}: {e} (got {} bytes)",
            input.len()
        ))
    })?;
    let id = job.email_id;

    let opts = database_opts()?;
    let smtp_url =
        std::env::var("SMTP_URL").map_err(|_| Config("SMTP_URL is not set".to_owned()))?;
    let claim_timeout: u64 = std::env::var("SEND_EMAIL_CLAIM_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let token = claim_token();

    let mut conn = connect(&opts)?;
    if let Err(e) = conn.exec_drop(
        "UPDATE emails SET claimed_at = NOW(6), claim_token = ? \
         WHERE id = ? AND sent_at IS NULL \
         AND (claimed_at IS NULL OR claim_token = ? OR claimed_at < NOW(6) - INTERVAL ? SECOND)",
        (&token, id, &token, claim_timeout),
    ) {
        // The claim may have been committed before the connection broke.
        release(&mut conn, &opts, id, &token);
        return Err(db_failure("claiming", id, e));
    }
    if conn.affected_rows() == 0 {
        let sent: Option<bool> = conn
            .exec_first("SELECT sent_at IS NOT NULL FROM emails WHERE id = ?", (id,))
            .map_err(|e| db_failure("reading", id, e))?;
        return match sent {
            None => Err(Permanent(format!("unknown email id {id}"))),
            Some(true) => Ok(format!("email {id} was already sent")),
            Some(false) => Err(Temporary(format!(
                "email {id} is being sent by another worker"
            ))),
        };
    }
    let row: Option<(String, String, String, String)> = match conn.exec_first(
        "SELECT sender, recipient, subject, body FROM emails WHERE id = ?",
        (id,),
    ) {
        Ok(row) => row,
        Err(e) => {
            release(&mut conn, &opts, id, &token);
            return Err(db_failure("reading", id, e));
        }
    };
    let Some((sender, recipient, subject, text)) = row else {
        return Err(Permanent(format!("unknown email id {id}")));
    };

    let message = match build_message(id, &sender, &recipient, &subject, text) {
        Ok(m) => m,
        Err(e) => {
            release(&mut conn, &opts, id, &token);
            return Err(e);
        }
    };
    let mailer = SmtpTransport::from_url(&smtp_url)
        .map_err(|e| Config(format!("SMTP_URL is invalid: {e}")))?
        .timeout(Some(Duration::from_secs(30)))
        .build();
    if let Err(e) = mailer.send(&message) {
        release(&mut conn, &opts, id, &token);
        return Err(if e.is_permanent() {
            Permanent(format!(
                "SMTP server rejected email {id} to {recipient}: {e}"
            ))
        } else {
            Temporary(format!("SMTP failed for email {id}: {e}"))
        });
    }

    // Sent: record it, on fresh connections if this one was lost meanwhile.
    let mark = "UPDATE emails SET sent_at = NOW(6) WHERE id = ? AND claim_token = ?";
    let mut last = match conn.exec_drop(mark, (id, &token)) {
        Ok(()) => return Ok(format!("sent email {id} to {recipient}")),
        Err(e) => e.to_string(),
    };
    for pause in [0, 200, 1000, 3000] {
        std::thread::sleep(Duration::from_millis(pause));
        match Conn::new(opts.clone()).and_then(|mut c| c.exec_drop(mark, (id, &token))) {
            Ok(()) => return Ok(format!("sent email {id} to {recipient}")),
            Err(e) => last = e.to_string(),
        }
    }
    Err(Temporary(format!(
        "email {id} was sent but could not be marked sent: {}",
        scrub(&last)
    )))
}

/// `DATABASE_URL` with connect and I/O timeouts.
fn database_opts() -> Result<Opts, Failure> {
    let url =
        std::env::var("DATABASE_URL").map_err(|_| Config("DATABASE_URL is not set".to_owned()))?;
    let opts = Opts::from_url(&url).map_err(|_| {
        Config("DATABASE_URL is not a valid mysql://user:password@host:port/database URL".into())
    })?;
    Ok(OptsBuilder::from_opts(opts)
        .tcp_connect_timeout(Some(Duration::from_secs(5)))
        .read_timeout(Some(Duration::from_secs(30)))
        .write_timeout(Some(Duration::from_secs(30)))
        .into())
}

fn connect(opts: &Opts) -> Result<Conn, Failure> {
    Conn::new(opts.clone()).map_err(|e| {
        Temporary(format!(
            "database unreachable at {}:{}: {}",
            opts.get_ip_or_hostname(),
            opts.get_tcp_port(),
            scrub(&e.to_string())
        ))
    })
}

fn db_failure(what: &str, id: u64, e: mysql::Error) -> Failure {
    Temporary(format!(
        "database error {what} email {id}: {}",
        scrub(&e.to_string())
    ))
}

/// Removes the database password from a message, in case a driver quoted it.
fn scrub(text: &str) -> String {
    let password = std::env::var("DATABASE_URL")
        .ok()
        .and_then(|u| Opts::from_url(&u).ok())
        .and_then(|o| o.get_pass().map(str::to_owned))
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => text.replace(&p, "***"),
        None => text.to_owned(),
    }
}

/// Gives the claim back after a failed send, so that a retry need not wait
/// for the claim to expire. Best effort: a claim that stays expires anyway.
fn release(conn: &mut Conn, opts: &Opts, id: u64, token: &str) {
    let q =
        "UPDATE emails SET claimed_at = NULL, claim_token = NULL WHERE id = ? AND claim_token = ?";
    if conn.exec_drop(q, (id, token)).is_err()
        && let Ok(mut fresh) = Conn::new(opts.clone())
    {
        let _ = fresh.exec_drop(q, (id, token));
    }
}

fn build_message(
    id: u64,
    sender: &str,
    recipient: &str,
    subject: &str,
    text: String,
) -> Result<Message, Failure> {
    let from = sender
        .parse()
        .map_err(|e| Permanent(format!("email {id}: bad sender address {sender:?}: {e}")))?;
    let to = recipient.parse().map_err(|e| {
        Permanent(format!(
            "email {id}: bad recipient address {recipient:?}: {e}"
        ))
    })?;
    Message::builder()
        .from(from)
        .to(to)
        .subject(subject)
        .message_id(Some(format!("<email-{id}@amqp-exec>")))
        .header(ContentType::TEXT_PLAIN)
        .body(text)
        .map_err(|e| Permanent(format!("email {id}: cannot build the message: {e}")))
}

/// The claim token: the AMQP message id, so that retries of one message
/// recognise their own claim; a per-process token when there is none.
fn claim_token() -> String {
    match std::env::var("AMQP_EXEC_MESSAGE_ID") {
        Ok(id) if !id.is_empty() => id.chars().take(64).collect(),
        _ => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("pid-{}-{nanos}", std::process::id())
        }
    }
}
