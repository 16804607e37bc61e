//! Message headers: converts AMQP field tables to JSON for `AMQP_EXEC_HEADERS`,
//! reads the integer headers amqp-exec uses for attempt counting, filters
//! tables, and measures tables and properties in their wire encoding.
//!
//! Conversion never panics, whatever the broker sends:
//! - strings that are valid UTF-8 stay strings; other long strings become
//!   lossy UTF-8 (invalid bytes as U+FFFD);
//! - byte arrays become `{"base64": "..."}`;
//! - decimals become JSON numbers, timestamps unix seconds, void `null`;
//! - non-finite floats become `null`;
//! - nesting deeper than [`MAX_DEPTH`] is cut off as `null`.

use base64::Engine;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value};

/// Nesting deeper than this is replaced by `null`.
pub const MAX_DEPTH: usize = 64;

/// Converts a header table to a JSON object.
pub fn to_json(table: &FieldTable) -> Value {
    table_to_json(table, 0)
}

fn table_to_json(table: &FieldTable, depth: usize) -> Value {
    if depth >= MAX_DEPTH {
        return Value::Null;
    }
    let mut map = Map::with_capacity(table.inner().len());
    for (key, value) in table.inner() {
        map.insert(key.as_str().to_owned(), value_to_json(value, depth + 1));
    }
    Value::Object(map)
}

fn value_to_json(value: &AMQPValue, depth: usize) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => {
            // The value is a signed 32-bit integer on the wire.
            let v = f64::from(d.value as i32) / 10f64.powi(i32::from(d.scale));
            Value::from(v)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => {
            if depth >= MAX_DEPTH {
                return Value::Null;
            }
            Value::Array(
                a.as_slice()
                    .iter()
                    .map(|v| value_to_json(v, depth + 1))
                    .collect(),
            )
        }
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => table_to_json(t, depth),
        AMQPValue::ByteArray(b) => {
            let mut m = Map::with_capacity(1);
            m.insert(
                "base64".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_slice())),
            );
            Value::Object(m)
        }
        AMQPValue::Void => Value::Null,
    }
}

/// The size of `table` in AMQP's wire encoding, in bytes. Iterative, so
/// that a deeply nested table cannot exhaust the stack.
pub fn encoded_size(table: &FieldTable) -> usize {
    let mut size = 4;
    let mut values: Vec<&AMQPValue> = Vec::new();
    for (key, value) in table.inner() {
        size += 1 + key.as_str().len();
        values.push(value);
    }
    while let Some(value) = values.pop() {
        // The type tag, then the value.
        size += 1 + match value {
            AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
            AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
            AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
            AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
            AMQPValue::DecimalValue(_) => 5,
            AMQPValue::ShortString(s) => 1 + s.as_str().len(),
            AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
            AMQPValue::ByteArray(a) => 4 + a.as_slice().len(),
            AMQPValue::Void => 0,
            AMQPValue::FieldArray(a) => {
                values.extend(a.as_slice());
                4
            }
            AMQPValue::FieldTable(t) => {
                for (key, value) in t.inner() {
                    size += 1 + key.as_str().len();
                    values.push(value);
                }
                4
            }
        };
    }
    size
}

/// The size of `props` in AMQP's wire encoding (the property flags and
/// every property present), in bytes.
pub fn properties_size(props: &BasicProperties) -> usize {
    let short =
        |s: &Option<lapin::types::ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    2 + short(props.content_type())
        + short(props.content_encoding())
        + props.headers().as_ref().map_or(0, encoded_size)
        + props.delivery_mode().map_or(0, |_| 1)
        + props.priority().map_or(0, |_| 1)
        + short(props.correlation_id())
        + short(props.reply_to())
        + short(props.expiration())
        + short(props.message_id())
        + props.timestamp().map_or(0, |_| 8)
        + short(props.kind())
        + short(props.user_id())
        + short(props.app_id())
        + short(props.cluster_id())
}

/// The size of the content-header frame that carries `props`: the frame's
/// header (7 bytes), class, weight and body size (12), the properties, and
/// the frame end (1). It must not exceed the connection's `frame_max`.
pub fn header_frame_size(props: &BasicProperties) -> usize {
    7 + 12 + properties_size(props) + 1
}

/// `table` without the entries named in `keys`.
pub fn without(table: &FieldTable, keys: &[&str]) -> FieldTable {
    if !keys.iter().any(|k| table.contains_key(k)) {
        return table.clone();
    }
    let kept: std::collections::BTreeMap<_, _> = table
        .inner()
        .iter()
        .filter(|(k, _)| !keys.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    FieldTable::from(kept)
}

/// Reads an integer header of any integer type (or a numeric string).
pub fn int(table: Option<&FieldTable>, key: &str) -> Option<i64> {
    let value = table?.inner().get(key)?;
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// Reads a string header (short or long string), lossy UTF-8.
pub fn string(table: Option<&FieldTable>, key: &str) -> Option<String> {
    match table?.inner().get(key)? {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, DecimalValue, FieldArray, LongString, ShortString};

    /// The bytes lapin's encoder writes for `table`.
    fn wire_size(table: &FieldTable) -> usize {
        let (bytes, _) =
            cookie_factory::r#gen(lapin::types::generation::gen_field_table(table), Vec::new())
                .unwrap();
        bytes.len()
    }

    #[test]
    fn properties_size_is_the_wire_size() {
        let props = BasicProperties::default()
            .with_headers(every_type())
            .with_content_type("text/plain".into())
            .with_content_encoding("gzip".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("100".into())
            .with_message_id("m".into())
            .with_timestamp(7)
            .with_type("t".into())
            .with_user_id("u".into())
            .with_app_id("a".into())
            .with_cluster_id("cl".into());
        for p in [props, BasicProperties::default()] {
            let (bytes, _) =
                cookie_factory::r#gen(lapin::protocol::basic::gen_properties(&p), Vec::new())
                    .unwrap();
            assert_eq!(properties_size(&p), bytes.len());
        }
    }

    #[test]
    fn without_removes_only_the_named_keys() {
        let t = every_type();
        let w = without(&t, &["bool", "missing"]);
        assert!(!w.contains_key("bool"));
        assert_eq!(w.inner().len(), t.inner().len() - 1);
        assert_eq!(without(&t, &["missing"]).inner().len(), t.inner().len());
    }

    #[test]
    fn encoded_size_is_the_wire_size() {
        let mut t = every_type();
        let inner = t.clone();
        t.insert(
            "nested".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::FieldTable(inner),
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(false)])),
            ])),
        );
        assert_eq!(encoded_size(&t), wire_size(&t));
        assert_eq!(encoded_size(&FieldTable::default()), 4);
    }

    /// A table with a value of every AMQP type.
    fn every_type() -> FieldTable {
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongInt(-5));
        let mut t = FieldTable::default();
        t.insert("bool".into(), AMQPValue::Boolean(true));
        t.insert("i8".into(), AMQPValue::ShortShortInt(-8));
        t.insert("u8".into(), AMQPValue::ShortShortUInt(8));
        t.insert("i16".into(), AMQPValue::ShortInt(-16));
        t.insert("u16".into(), AMQPValue::ShortUInt(16));
        t.insert("i32".into(), AMQPValue::LongInt(-32));
        t.insert("u32".into(), AMQPValue::LongUInt(32));
        t.insert("i64".into(), AMQPValue::LongLongInt(-64));
        t.insert("f32".into(), AMQPValue::Float(1.5));
        t.insert("f64".into(), AMQPValue::Double(2.25));
        t.insert("nan".into(), AMQPValue::Double(f64::NAN));
        t.insert(
            "dec".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1234,
            }),
        );
        t.insert(
            "negdec".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: (-125i32) as u32,
            }),
        );
        t.insert(
            "ss".into(),
            AMQPValue::ShortString(ShortString::from("short")),
        );
        t.insert("ls".into(), AMQPValue::LongString(LongString::from("long")));
        t.insert(
            "bad".into(),
            AMQPValue::LongString(LongString::from(vec![0xff, b'a', 0])),
        );
        t.insert(
            "arr".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::Void,
            ])),
        );
        t.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("table".into(), AMQPValue::FieldTable(inner));
        t.insert(
            "bytes".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255])),
        );
        t.insert("void".into(), AMQPValue::Void);
        t
    }

    #[test]
    fn every_type_converts() {
        let t = every_type();

        let v = to_json(&t);
        let text = serde_json::to_string(&v).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["bool"], true);
        assert_eq!(back["i8"], -8);
        assert_eq!(back["u32"], 32);
        assert_eq!(back["i64"], -64);
        assert_eq!(back["f32"], 1.5);
        assert_eq!(back["nan"], Value::Null);
        assert_eq!(back["dec"], 12.34);
        assert_eq!(back["negdec"], -1.25);
        assert_eq!(back["ss"], "short");
        assert_eq!(back["bad"], "\u{fffd}a\u{0}");
        assert_eq!(back["arr"][0], 1);
        assert_eq!(back["ts"], 1_700_000_000u64);
        assert_eq!(back["table"]["n"], -5);
        assert_eq!(back["bytes"]["base64"], "AP8=");
        assert_eq!(back["void"], Value::Null);
    }

    #[test]
    fn deep_nesting_is_cut_off() {
        let mut t = FieldTable::default();
        for _ in 0..500 {
            let mut outer = FieldTable::default();
            outer.insert("t".into(), AMQPValue::FieldTable(t));
            t = outer;
        }
        let v = to_json(&t);
        serde_json::to_string(&v).unwrap();
    }

    #[test]
    fn ints() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::ShortShortUInt(3));
        t.insert("b".into(), AMQPValue::LongString("7".into()));
        t.insert("c".into(), AMQPValue::Boolean(true));
        assert_eq!(int(Some(&t), "a"), Some(3));
        assert_eq!(int(Some(&t), "b"), Some(7));
        assert_eq!(int(Some(&t), "c"), None);
        assert_eq!(int(None, "a"), None);
    }
}
