//! W3C Trace Context (`traceparent`, `tracestate`) and W3C Baggage as
//! text: strict parsing of what a publisher sent, and formatting of what
//! amqp-exec sends on. Pure; publishers are not trusted, so every value is
//! checked against the grammar and bounded, and anything else is refused.

use lapin::types::{AMQPValue, FieldTable};

/// The message header (and, upper-cased, the environment variable) of each.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const BAGGAGE: &str = "baggage";

/// The W3C limits of a `tracestate` that is propagated whole.
pub const MAX_TRACESTATE_LEN: usize = 512;
pub const MAX_TRACESTATE_MEMBERS: usize = 32;
/// The W3C Baggage limits.
pub const MAX_BAGGAGE_LEN: usize = 8192;
pub const MAX_BAGGAGE_MEMBERS: usize = 180;
/// The longest `traceparent` read: version 00 is 55 characters; later
/// versions may append fields.
const MAX_TRACEPARENT_LEN: usize = 256;

/// The sampled flag, the only one propagated.
pub const SAMPLED: u8 = 0x01;

/// A span's identity as `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl SpanContext {
    /// The `traceparent` value naming this span.
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        hex(&mut s, &self.trace_id);
        s.push('-');
        hex(&mut s, &self.span_id);
        s.push('-');
        hex(&mut s, &[self.flags & SAMPLED]);
        s
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

/// Lower-case hex only, as the W3C format requires.
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Not a string or byte array, or not ASCII.
    NotText,
    TooLong,
    /// Not the format: bad hex, a missing dash, version `ff`, ...
    Format,
    /// An all-zero trace id or span id.
    ZeroId,
    TooManyMembers,
    DuplicateKey,
}

impl Invalid {
    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::NotText => "not ASCII text",
            Invalid::TooLong => "too long",
            Invalid::Format => "not in the W3C format",
            Invalid::ZeroId => "an all-zero id",
            Invalid::TooManyMembers => "too many members",
            Invalid::DuplicateKey => "a duplicate key",
        }
    }
}

/// Parses a `traceparent` value strictly (W3C Trace Context level 1):
/// version 00 is exactly 55 characters; a later version is read as version
/// 00 when what follows its first 55 characters starts with a dash.
pub fn parse_traceparent(s: &[u8]) -> Result<SpanContext, Invalid> {
    if s.len() > MAX_TRACEPARENT_LEN {
        return Err(Invalid::TooLong);
    }
    if s.len() < 55 || s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
        return Err(Invalid::Format);
    }
    let version = unhex::<1>(&s[..2]).ok_or(Invalid::Format)?[0];
    match version {
        0xff => return Err(Invalid::Format),
        0 if s.len() != 55 => return Err(Invalid::Format),
        _ if s.len() > 55 && s[55] != b'-' => return Err(Invalid::Format),
        _ => {}
    }
    let trace_id = unhex::<16>(&s[3..35]).ok_or(Invalid::Format)?;
    let span_id = unhex::<8>(&s[36..52]).ok_or(Invalid::Format)?;
    let flags = unhex::<1>(&s[53..55]).ok_or(Invalid::Format)?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return Err(Invalid::ZeroId);
    }
    Ok(SpanContext {
        trace_id,
        span_id,
        flags,
    })
}

/// Checks a `tracestate` value: at most [`MAX_TRACESTATE_MEMBERS`] members
/// of the W3C grammar with distinct keys, at most [`MAX_TRACESTATE_LEN`]
/// characters. Returns it with the optional blanks and empty members left
/// out; `None` when it has no member.
pub fn parse_tracestate(s: &str) -> Result<Option<String>, Invalid> {
    if s.len() > MAX_TRACESTATE_LEN {
        return Err(Invalid::TooLong);
    }
    let mut keys: Vec<&str> = Vec::new();
    let mut out = String::with_capacity(s.len());
    for member in s.split(',').map(|m| m.trim_matches([' ', '\t'])) {
        if member.is_empty() {
            continue;
        }
        let (key, value) = member.split_once('=').ok_or(Invalid::Format)?;
        if !tracestate_key(key) || !tracestate_value(value) {
            return Err(Invalid::Format);
        }
        if keys.contains(&key) {
            return Err(Invalid::DuplicateKey);
        }
        keys.push(key);
        if keys.len() > MAX_TRACESTATE_MEMBERS {
            return Err(Invalid::TooManyMembers);
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(member);
    }
    Ok((!out.is_empty()).then_some(out))
}

fn tracestate_key(key: &str) -> bool {
    let b = key.as_bytes();
    let tail = |c: &u8| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/');
    match key.split_once('@') {
        None => {
            (1..=256).contains(&b.len()) && b[0].is_ascii_lowercase() && b[1..].iter().all(tail)
        }
        Some((tenant, system)) => {
            let (t, s) = (tenant.as_bytes(), system.as_bytes());
            (1..=241).contains(&t.len())
                && (t[0].is_ascii_lowercase() || t[0].is_ascii_digit())
                && t[1..].iter().all(tail)
                && (1..=14).contains(&s.len())
                && s[0].is_ascii_lowercase()
                && s[1..].iter().all(tail)
        }
    }
}

fn tracestate_value(value: &str) -> bool {
    let b = value.as_bytes();
    let nblk = |c: u8| matches!(c, 0x21..=0x2b | 0x2d..=0x3c | 0x3e..=0x7e);
    (1..=256).contains(&b.len())
        && b[..b.len() - 1].iter().all(|&c| c == b' ' || nblk(c))
        && nblk(b[b.len() - 1])
}

/// Checks a `baggage` value (W3C Baggage): at most [`MAX_BAGGAGE_MEMBERS`]
/// members `key=value` with optional `;properties`, at most
/// [`MAX_BAGGAGE_LEN`] bytes, printable ASCII. Returns it with the blanks
/// around members left out; `None` when it has no member.
pub fn parse_baggage(s: &str) -> Result<Option<String>, Invalid> {
    if s.len() > MAX_BAGGAGE_LEN {
        return Err(Invalid::TooLong);
    }
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
    };
    let octets = |v: &str| {
        v.bytes()
            .all(|c| matches!(c, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e))
    };
    let mut members = 0;
    let mut out = String::with_capacity(s.len());
    for member in s.split(',').map(|m| m.trim_matches([' ', '\t'])) {
        if member.is_empty() {
            continue;
        }
        let mut parts = member.split(';');
        let first = parts.next().unwrap_or_default();
        let (key, value) = first.split_once('=').ok_or(Invalid::Format)?;
        if !token(key.trim_matches([' ', '\t'])) || !octets(value.trim_matches([' ', '\t'])) {
            return Err(Invalid::Format);
        }
        for property in parts {
            let (k, v) = property.split_once('=').unwrap_or((property, ""));
            if !token(k.trim_matches([' ', '\t'])) || !octets(v.trim_matches([' ', '\t'])) {
                return Err(Invalid::Format);
            }
        }
        members += 1;
        if members > MAX_BAGGAGE_MEMBERS {
            return Err(Invalid::TooManyMembers);
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(member);
    }
    Ok((!out.is_empty()).then_some(out))
}

/// The text of header `key`: a long or short string, or a byte array, of
/// ASCII. `Ok(None)` when the header is absent.
pub fn header_text<'a>(h: Option<&'a FieldTable>, key: &str) -> Result<Option<&'a str>, Invalid> {
    let Some(v) = h.and_then(|t| t.inner().get(key)) else {
        return Ok(None);
    };
    let bytes: &[u8] = match v {
        AMQPValue::LongString(s) => s.as_bytes(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes(),
        AMQPValue::ByteArray(b) => b.as_slice(),
        _ => return Err(Invalid::NotText),
    };
    if !bytes.is_ascii() {
        return Err(Invalid::NotText);
    }
    std::str::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Invalid::NotText)
}

/// The trace context a message carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    pub parent: Option<SpanContext>,
    /// Only with a valid parent.
    pub tracestate: Option<String>,
    pub baggage: Option<String>,
    /// The first header that was refused, and why.
    pub invalid: Option<(&'static str, Invalid)>,
}

/// Reads `traceparent`, `tracestate` and `baggage` from a message's
/// headers. An invalid `traceparent` invalidates its `tracestate` too
/// (W3C); an invalid `baggage` is left out on its own.
pub fn extract(h: Option<&FieldTable>) -> Extracted {
    let mut e = Extracted::default();
    let mut refused = Vec::new();
    match header_text(h, TRACEPARENT)
        .and_then(|t| t.map(|t| parse_traceparent(t.as_bytes())).transpose())
    {
        Ok(parent) => e.parent = parent,
        Err(why) => refused.push((TRACEPARENT, why)),
    }
    if e.parent.is_some() {
        match header_text(h, TRACESTATE).and_then(|t| t.map(parse_tracestate).transpose()) {
            Ok(state) => e.tracestate = state.flatten(),
            Err(why) => refused.push((TRACESTATE, why)),
        }
    }
    match header_text(h, BAGGAGE).and_then(|t| t.map(parse_baggage).transpose()) {
        Ok(b) => e.baggage = b.flatten(),
        Err(why) => refused.push((BAGGAGE, why)),
    }
    e.invalid = refused.first().copied();
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, LongString, ShortString};

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trip() {
        let sc = parse_traceparent(TP.as_bytes()).unwrap();
        assert_eq!(sc.trace_id[0], 0x4b);
        assert_eq!(sc.span_id[7], 0xb7);
        assert!(sc.sampled());
        assert_eq!(sc.traceparent(), TP);
        // Unknown flags are not passed on.
        let other = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff";
        assert!(
            parse_traceparent(other.as_bytes())
                .unwrap()
                .traceparent()
                .ends_with("-01")
        );
        // A later version with more fields is read as version 00.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert_eq!(parse_traceparent(later.as_bytes()).unwrap(), sc);
    }

    #[test]
    fn bad_traceparents_are_refused() {
        let long = format!("{TP}{}", "0".repeat(300));
        for (bad, why) in [
            ("", Invalid::Format),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                Invalid::Format,
            ),
            (&format!("{TP}-"), Invalid::Format),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                Invalid::Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                Invalid::Format,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Invalid::Format,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                Invalid::ZeroId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                Invalid::ZeroId,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Invalid::Format,
            ),
            (
                "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                Invalid::Format,
            ),
            (&long, Invalid::TooLong),
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), Err(why), "{bad:?}");
        }
        assert!(parse_traceparent(b"00-\xff\xfe").is_err());
    }

    #[test]
    fn tracestate_is_checked_and_bounded() {
        assert_eq!(
            parse_tracestate(" rojo=00f067aa0ba902b7 ,, congo=t61rcWkgMzE,t@sys=a b")
                .unwrap()
                .as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,t@sys=a b")
        );
        assert_eq!(parse_tracestate("").unwrap(), None);
        for (bad, why) in [
            ("Rojo=1", Invalid::Format),
            ("rojo", Invalid::Format),
            ("rojo=a,rojo=b", Invalid::DuplicateKey),
            ("rojo=a=b", Invalid::Format),
            ("rojo=a\tb", Invalid::Format),
            ("rojo=", Invalid::Format),
            ("rojo=a\u{1}", Invalid::Format),
        ] {
            assert_eq!(parse_tracestate(bad), Err(why), "{bad:?}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            parse_tracestate(&many.join(",")),
            Err(Invalid::TooManyMembers)
        );
        assert_eq!(
            parse_tracestate(&many[..32].join(","))
                .unwrap()
                .unwrap()
                .split(',')
                .count(),
            32
        );
        let long = format!("k={}", "v".repeat(511));
        assert_eq!(parse_tracestate(&long), Err(Invalid::TooLong));
    }

    #[test]
    fn baggage_is_checked_and_bounded() {
        assert_eq!(
            parse_baggage("userId=alice, serverNode=DF%2028;prop=1 ,isProduction=false")
                .unwrap()
                .as_deref(),
            Some("userId=alice,serverNode=DF%2028;prop=1,isProduction=false")
        );
        for bad in ["novalue", "=v", "k=v\"", "k=a,b c=d", "k=\u{7f}"] {
            assert!(parse_baggage(bad).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..181).map(|i| format!("k{i}=v")).collect();
        assert_eq!(parse_baggage(&many.join(",")), Err(Invalid::TooManyMembers));
        assert_eq!(
            parse_baggage(&format!("k={}", "v".repeat(9000))),
            Err(Invalid::TooLong)
        );
    }

    #[test]
    fn headers_may_be_strings_or_bytes() {
        for value in [
            AMQPValue::LongString(LongString::from(TP)),
            AMQPValue::ShortString(ShortString::from(TP)),
            AMQPValue::ByteArray(ByteArray::from(TP.as_bytes())),
        ] {
            let mut t = FieldTable::default();
            t.insert(TRACEPARENT.into(), value);
            t.insert(TRACESTATE.into(), AMQPValue::LongString("a=b".into()));
            let e = extract(Some(&t));
            assert_eq!(e.parent.unwrap().traceparent(), TP);
            assert_eq!(e.tracestate.as_deref(), Some("a=b"));
            assert_eq!(e.invalid, None);
        }
        assert_eq!(extract(None), Extracted::default());
    }

    #[test]
    fn hostile_headers_are_refused_and_named() {
        let table = |tp: AMQPValue, ts: &str, bg: &str| {
            let mut t = FieldTable::default();
            t.insert(TRACEPARENT.into(), tp);
            t.insert(TRACESTATE.into(), AMQPValue::LongString(ts.into()));
            t.insert(BAGGAGE.into(), AMQPValue::LongString(bg.into()));
            t
        };
        // A bad traceparent drops its tracestate; good baggage is kept.
        let e = extract(Some(&table(AMQPValue::LongInt(7), "a=b", "k=v")));
        assert_eq!((e.parent, e.tracestate.as_deref()), (None, None));
        assert_eq!(e.baggage.as_deref(), Some("k=v"));
        assert_eq!(e.invalid, Some((TRACEPARENT, Invalid::NotText)));
        let binary = AMQPValue::ByteArray(ByteArray::from(&[0u8, 0xff, 0x80][..]));
        assert_eq!(
            extract(Some(&table(binary, "", ""))).invalid,
            Some((TRACEPARENT, Invalid::NotText))
        );
        // A good traceparent with a bad tracestate keeps the parent.
        let tp = AMQPValue::LongString(TP.into());
        let e = extract(Some(&table(tp.clone(), &"x".repeat(600), "")));
        assert!(e.parent.is_some() && e.tracestate.is_none());
        assert_eq!(e.invalid, Some((TRACESTATE, Invalid::TooLong)));
        let e = extract(Some(&table(tp, "a=b", "k=\"v\"")));
        assert_eq!(e.baggage, None);
        assert_eq!(e.invalid, Some((BAGGAGE, Invalid::Format)));
    }
}
