//! db-report: an amqp-exec unit worker for fan-out reports.
//!
//! Reads a database name on stdin, opens its own connection to it (server and
//! credentials from `DATABASE_URL`), runs `REPORT_QUERY` (default
//! `SELECT COUNT(*) FROM orders`) and prints `{"database": …, "total": …}`
//! from the first column of the first row. With `amqp-exec publish --reply
//! --lines`, one database per line, the queries run in parallel and the
//! caller gets the results in input order.
//!
//! Exit statuses: 0 done; 65 bad or unknown database name; 75 database
//! unreachable or the query failed; 78 `DATABASE_URL` missing or invalid.

use mysql::prelude::Queryable;
use mysql::{Conn, Opts, OptsBuilder, Value};
use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err((code, message)) => {
            eprintln!("db-report: {message}");
            ExitCode::from(code)
        }
    }
}

fn run() -> Result<String, (u8, String)> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| (65, format!("stdin is not text: {e}")))?;
    let database = input.trim();
    if database.is_empty()
        || database.len() > 64
        || !database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err((65, format!("bad database name {database:?}")));
    }
    let url = std::env::var("DATABASE_URL").map_err(|_| (78, "DATABASE_URL is not set".into()))?;
    let opts = Opts::from_url(&url)
        .map_err(|_| (78, "DATABASE_URL is not a valid mysql:// URL".to_owned()))?;
    let opts = OptsBuilder::from_opts(opts)
        .db_name(Some(database))
        .tcp_connect_timeout(Some(Duration::from_secs(5)));
    let mut conn = Conn::new(opts).map_err(|e| {
        let text = e.to_string();
        if text.contains("1049") || text.contains("Unknown database") {
            (65, format!("unknown database {database:?}"))
        } else {
            (
                75,
                format!("cannot connect for {database:?}: {}", scrub(&text, &url)),
            )
        }
    })?;
    let query =
        std::env::var("REPORT_QUERY").unwrap_or_else(|_| "SELECT COUNT(*) FROM orders".into());
    let row: Option<mysql::Row> = conn.query_first(&query).map_err(|e| {
        (
            75,
            format!(
                "query failed on {database:?}: {}",
                scrub(&e.to_string(), &url)
            ),
        )
    })?;
    let total = match row.and_then(|r| r.as_ref(0).cloned()) {
        Some(Value::Int(n)) => serde_json::Value::from(n),
        Some(Value::UInt(n)) => serde_json::Value::from(n),
        Some(Value::Double(f)) => serde_json::Value::from(f),
        Some(Value::Float(f)) => serde_json::Value::from(f64::from(f)),
        Some(Value::Bytes(b)) => {
            let s = String::from_utf8_lossy(&b).into_owned();
            s.parse::<i64>()
                .map(serde_json::Value::from)
                .or_else(|_| s.parse::<f64>().map(serde_json::Value::from))
                .unwrap_or(serde_json::Value::String(s))
        }
        _ => serde_json::Value::Null,
    };
    Ok(serde_json::json!({"database": database, "total": total}).to_string())
}

/// Removes the password of `url` from an error text.
fn scrub(text: &str, url: &str) -> String {
    match Opts::from_url(url)
        .ok()
        .and_then(|o| o.get_pass().map(str::to_owned))
    {
        Some(p) if !p.is_empty() => text.replace(&p, "***"),
        _ => text.to_owned(),
    }
}
