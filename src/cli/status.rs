//! `amqp-exec status`: fetches `/status.json` from a running supervisor's
//! metrics listener (a plain HTTP GET) and prints it as tables; `--watch`
//! refreshes it, `--json` prints the JSON as it came.
//!
//! What the report holds came partly from publishers and workers (message
//! ids, reasons, stderr): control characters are replaced before it reaches
//! the terminal.

use super::{EX_UNAVAILABLE, Failure};
use crate::status::{Report, human_secs, rates_text, totals_text};
use std::fmt::Write as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long connecting, and then reading the answer, may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);
const READ_LIMIT: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_ANSWER: u64 = 64 << 20;

/// Options of `amqp-exec status`.
#[derive(Debug, Clone)]
pub struct StatusArgs {
    /// The listener, as `host:port`.
    pub addr: String,
    /// Refresh every this often.
    pub watch: Option<Duration>,
    /// Print the JSON as it came.
    pub json: bool,
}

/// The `host:port` of a `--url` (`http://host:port`, with or without the
/// scheme and a path).
pub fn parse_status_url(url: &str) -> Result<String, String> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{url:?}: the metrics listener speaks plain http, not {scheme}"
            ));
        }
        None => url,
    };
    let authority = rest.split('/').next().unwrap_or("");
    let has_port = match authority.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && (!host.contains(':') || host.ends_with(']'))
                && port.parse::<u16>().is_ok()
        }
        None => false,
    };
    if !has_port {
        return Err(format!(
            "{url:?} is not host:port such as 127.0.0.1:9464 (the [metrics] listen address)"
        ));
    }
    Ok(authority.to_owned())
}

/// The address to reach a listener bound to `listen`: a wildcard address
/// is reached on loopback.
pub fn reachable(listen: std::net::SocketAddr) -> String {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port()).to_string()
}

/// The listener of the config at `path`: its `[metrics] listen`.
pub fn addr_from_config(path: &std::path::Path) -> Result<String, Failure> {
    let cfg = crate::config::load(path, None).map_err(|e| {
        Failure::new(
            crate::config::EX_CONFIG,
            format!("{e} (status reads the listener's address from it; or give --url)"),
        )
    })?;
    match cfg.metrics_listen {
        Some(listen) => Ok(reachable(listen)),
        None => Err(Failure::new(
            crate::config::EX_CONFIG,
            format!(
                "{} has no [metrics] listen: the status page is served on the metrics listener; \
                 set it, or give --url",
                path.display()
            ),
        )),
    }
}

/// Runs `amqp-exec status`.
pub async fn status(args: StatusArgs) -> Result<(), Failure> {
    let Some(every) = args.watch else {
        let body = fetch(&args.addr).await?;
        return print(&show(&body, args.json)?);
    };
    loop {
        let screen = match fetch(&args.addr).await {
            Ok(body) => show(&body, args.json),
            Err(e) => Err(e),
        };
        let text = match screen {
            Ok(text) => text,
            Err(e) => format!("amqp-exec: {} (trying again)\n", e.message),
        };
        if args.json {
            print(&text)?;
        } else {
            print(&format!(
                "\x1b[H\x1b[2J{text}\nevery {}s; Ctrl-C to stop\n",
                every.as_secs_f64()
            ))?;
        }
        tokio::time::sleep(every).await;
    }
}

fn print(text: &str) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(1, format!("cannot write to standard output: {e}")))
}

/// What to print of the answer `body`.
fn show(body: &str, json: bool) -> Result<String, Failure> {
    if json {
        let mut text = body.trim_end().to_owned();
        text.push('\n');
        return Ok(text);
    }
    let report: Report = serde_json::from_str(body).map_err(|e| {
        Failure::new(
            1,
            format!("the status page's answer is not a status report: {e}"),
        )
    })?;
    Ok(render_text(&report))
}

/// GETs `/status.json` from `addr`; its body.
async fn fetch(addr: &str) -> Result<String, Failure> {
    let url = format!("http://{addr}/status.json");
    let unreachable = |why: String| {
        Failure::new(
            EX_UNAVAILABLE,
            format!(
                "nothing answers at {url} ({why}): is amqp-exec running, with [metrics] listen \
                 at this address? (--url sets another)"
            ),
        )
    };
    let mut stream =
        match tokio::time::timeout(CONNECT_LIMIT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {}s",
                    CONNECT_LIMIT.as_secs()
                )));
            }
        };
    let request = format!(
        "GET /status.json HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: amqp-exec\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    let mut answer = Vec::new();
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        (&mut stream)
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .await
    };
    match tokio::time::timeout(READ_LIMIT, exchange).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => {
            return Err(unreachable(format!(
                "no full answer within {}s",
                READ_LIMIT.as_secs()
            )));
        }
    }
    let (status, body) = split_answer(&answer)
        .ok_or_else(|| Failure::new(1, format!("{url} did not answer in HTTP")))?;
    if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
        return Err(Failure::new(
            1,
            format!(
                "{url} answered {:?}: is this amqp-exec's metrics listener?",
                term(status)
            ),
        ));
    }
    String::from_utf8(body.to_vec())
        .map_err(|_| Failure::new(1, format!("the answer of {url} is not UTF-8")))
}

/// An HTTP answer's status line and body.
fn split_answer(answer: &[u8]) -> Option<(&str, &[u8])> {
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..end]).ok()?;
    let status = head.lines().next()?;
    status
        .starts_with("HTTP/")
        .then_some((status, &answer[end + 4..]))
}

/// `text` fit for a terminal: control characters (escape sequences, line
/// ends) are shown as `?`.
pub fn term(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A message id for the terminal; a message without one says so.
fn id_text(id: &str) -> String {
    if id.is_empty() {
        "(no id)".to_owned()
    } else {
        term(id)
    }
}

/// Columns padded to their widest cell.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            let _ = write!(text, "{cell}{}  ", " ".repeat(pad));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut head.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// The report as tables.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "amqp-exec {} · {} · {}\n",
        term(&r.version),
        if r.stopping {
            "stopping"
        } else if r.connected {
            "connected"
        } else {
            "NOT CONNECTED"
        },
        term(&r.generated_at)
    );
    let rows: Vec<Vec<String>> = r
        .queues
        .iter()
        .map(|q| {
            vec![
                term(&q.name),
                term(&q.state),
                format!("{}/{}", q.busy, q.concurrency),
                rates_text(&q.rates),
                totals_text(&q.totals),
                q.dead_letters.count.to_string(),
            ]
        })
        .collect();
    let rates = format!("RATES ({}S)", r.rate_window_secs);
    out.push_str(&table(
        &["QUEUE", "STATE", "BUSY", &rates, "TOTALS", "DEAD"],
        &rows,
    ));
    for q in &r.queues {
        if let Some(why) = &q.reason {
            let _ = writeln!(
                out,
                "{} {} for {}: {}",
                term(&q.name),
                term(&q.state),
                human_secs(q.since_secs),
                term(why)
            );
        }
    }

    let _ = writeln!(out, "\nRUNNING JOBS: {}", r.running_count);
    if !r.running.is_empty() {
        let rows: Vec<Vec<String>> = r
            .running
            .iter()
            .map(|j| {
                vec![
                    term(&j.queue),
                    id_text(&j.message_id),
                    j.attempt.to_string(),
                    j.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                    term(&j.phase),
                    human_secs(j.running_secs),
                    human_secs(j.timeout_secs),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "QUEUE",
                "MESSAGE ID",
                "ATTEMPT",
                "PID",
                "PHASE",
                "RUNNING",
                "TIMEOUT",
            ],
            &rows,
        ));
        if r.running_count > r.running.len() {
            let _ = writeln!(out, "and {} more", r.running_count - r.running.len());
        }
    }

    let failed: Vec<_> = r
        .queues
        .iter()
        .filter_map(|q| q.last_failure.as_ref().map(|f| (q, f)))
        .collect();
    if !failed.is_empty() {
        out.push_str("\nLAST FAILURES\n");
        for (q, f) in failed {
            let _ = writeln!(
                out,
                "{}: exit {}, {} ago ({}), message {} attempt {}",
                term(&q.name),
                term(&f.exit),
                human_secs(f.ago_secs),
                term(&f.at),
                id_text(&f.message_id),
                f.attempt
            );
            if let Some(stderr) = &f.stderr {
                for l in stderr.lines() {
                    let _ = writeln!(out, "  | {}", term(l));
                }
            }
        }
    }

    let dead: Vec<Vec<String>> = r
        .queues
        .iter()
        .flat_map(|q| {
            q.dead_letters.recent.iter().map(|d| {
                vec![
                    term(&q.name),
                    format!("{} ago", human_secs(d.ago_secs)),
                    id_text(&d.message_id),
                    d.attempt.to_string(),
                    term(&d.why),
                ]
            })
        })
        .collect();
    if !dead.is_empty() {
        out.push_str("\nRECENT DEAD LETTERS\n");
        out.push_str(&table(
            &["QUEUE", "WHEN", "MESSAGE ID", "ATTEMPT", "WHY"],
            &dead,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            parse_status_url("127.0.0.1:9464").unwrap(),
            "127.0.0.1:9464"
        );
        assert_eq!(
            parse_status_url("http://localhost:9464/status").unwrap(),
            "localhost:9464"
        );
        assert_eq!(parse_status_url("http://[::1]:9464").unwrap(), "[::1]:9464");
        for bad in ["https://x:1", "localhost", "http://:9464", "::1", "x:port"] {
            assert!(parse_status_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        assert_eq!(reachable("0.0.0.0:9464".parse().unwrap()), "127.0.0.1:9464");
        assert_eq!(reachable("[::]:9464".parse().unwrap()), "[::1]:9464");
        assert_eq!(reachable("10.0.0.1:1".parse().unwrap()), "10.0.0.1:1");
    }

    #[test]
    fn answers_split_into_status_and_body() {
        let (status, body) =
            split_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, b"{}");
        assert!(split_answer(b"SSH-2.0-OpenSSH\r\n").is_none());
    }

    #[test]
    fn terminal_text_has_no_control_characters() {
        assert_eq!(term("a\u{1b}[2Jb\r\nc"), "a?[2Jb??c");
    }

    #[test]
    fn tables_line_up() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["wide cell".into(), "x".into()],
                vec!["é".into(), "y".into()],
            ],
        );
        assert_eq!(t, "A          LONGER\nwide cell  x\né          y\n");
    }
}
