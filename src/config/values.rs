//! Value parsers of the config and the command line: durations, sizes and
//! rates, and the one-line form of an error text.

use super::raw::RawSize;
use std::time::Duration;

/// Parses a rate: "14/s", "100/m", "3600/h".
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let bad =
        || format!("bad rate {s:?}: write a count per unit, e.g. \"14/s\", \"100/m\", \"500/h\"");
    let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let n: f64 = n.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(bad());
    }
    let rate = n / per;
    // Starts are spaced 1/rate apart: keep that within what a timer holds.
    if !(rate.is_finite() && rate >= MIN_RATE) {
        return Err(format!(
            "rate {s:?} is out of range: at least one per 49 days, e.g. \"1/h\""
        ));
    }
    Ok(rate)
}

/// Lowest `max_rate`, per second: one start per 49 days.
pub(super) const MIN_RATE: f64 = 1.0 / (49.0 * 86_400.0);

pub(super) fn size_of(raw: RawSize) -> Result<u64, String> {
    match raw {
        RawSize::Bytes(n) => Ok(n),
        RawSize::Text(s) => parse_size(&s),
    }
}

/// Parses sizes: a number of bytes with an optional unit K, M, G (powers of
/// 1024, with or without a trailing "B" or "iB").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || format!("bad size {s:?}: write bytes or a number with K, M or G, e.g. \"64M\"");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// Parses durations written as a number and a unit: `500ms`, `30s`, `5m`,
/// `1h`, `1d`, or `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || {
        format!(
            "bad duration {s:?}: write a number and a unit, e.g. \"500ms\", \"30s\", \"5m\", \"1h\""
        )
    };
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    const MAX_MS: u64 = 1_000_000_000_000; // about 31 years
    if !number.contains('.') {
        // Whole numbers are exact.
        let n: u64 = number.parse().map_err(|_| bad())?;
        return match n.checked_mul(unit_ms) {
            Some(ms) if ms <= MAX_MS => Ok(Duration::from_millis(ms)),
            _ => Err(bad()),
        };
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let ms = value * unit_ms as f64;
    if !ms.is_finite() || ms > MAX_MS as f64 {
        return Err(bad());
    }
    // Fractions are kept to the microsecond.
    Ok(Duration::from_micros((ms * 1000.0).round() as u64))
}

/// Formats a duration in the shortest unit that keeps it whole: `500ms`,
/// `10s`, `5m`, `1h`. Used in retry queue names.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

pub(super) fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}
