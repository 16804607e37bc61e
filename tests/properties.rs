//! Property tests (fuzzing) of the parts that read untrusted input: the
//! config parser and the conversion of AMQP headers to JSON. They must never
//! panic, whatever they are given.
//!
//! `PROPTEST_CASES=1000000 cargo test --release --test properties` runs a
//! long session.

use amqp_exec::{config, headers};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use proptest::prelude::*;
use std::path::Path;

fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        any::<String>()
            .prop_map(|s| AMQPValue::ShortString(s.chars().take(255).collect::<String>().into())),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(8, 256, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            proptest::collection::vec(("[a-z-]{1,12}", inner), 0..8).prop_map(|kv| {
                let mut t = FieldTable::default();
                for (k, v) in kv {
                    t.insert(k.into(), v);
                }
                AMQPValue::FieldTable(t)
            }),
        ]
    })
}

fn table() -> impl Strategy<Value = FieldTable> {
    proptest::collection::vec(("[ -~]{0,20}", amqp_value()), 0..16).prop_map(|kv| {
        let mut t = FieldTable::default();
        for (k, v) in kv {
            t.insert(k.into(), v);
        }
        t
    })
}

/// Config text built from real keys with odd values, so that the parser goes
/// past TOML syntax into validation.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("name"),
        Just("command"),
        Just("concurrency"),
        Just("prefetch"),
        Just("timeout"),
        Just("kill_grace"),
        Just("max_attempts"),
        Just("backoff"),
        Just("max_body_bytes"),
        Just("max_reply_bytes"),
        Just("memory_limit"),
        Just("cpu_time"),
        Just("nice"),
        Just("max_open_files"),
        Just("declare"),
        Just("clear_env"),
        Just("on_connection_loss"),
        Just("working_dir"),
        Just("user"),
        Just("bogus"),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[0-9]{0,4}(ms|s|m|h|d|x|K|M|G|)\"",
        "\"[ -~]{0,12}\"".prop_map(|s| s.replace('\\', "")),
        Just("[]".to_owned()),
        Just("[\"/bin/true\"]".to_owned()),
        Just("[\"1s\", \"0s\", \"bad\"]".to_owned()),
        Just("true".to_owned()),
        Just("{ a = 1 }".to_owned()),
        Just("1.5".to_owned()),
        "\"[0-9]{0,3}/[smhx]?\"",
        Just("\"quorum\"".to_owned()),
        Just("[{ exchange = \"e\", type = \"topic\", routing_key = \"a.*\" }]".to_owned()),
        Just("[{ exchange = \"\" }]".to_owned()),
        Just("{ x-queue-type = \"stream\" }".to_owned()),
    ];
    let queue = proptest::collection::vec((key, value), 0..8).prop_map(|kv| {
        let mut s = String::from("[[queue]]\n");
        for (k, v) in kv {
            s.push_str(&format!("{k} = {v}\n"));
        }
        s
    });
    (
        proptest::collection::vec(queue, 0..3),
        prop_oneof![
            Just(""),
            Just("max_workers = 0\n"),
            Just("shutdown_grace = \"x\"\n"),
            Just("[metrics]\nlisten = \"x\"\n")
        ],
    )
        .prop_map(|(queues, top)| format!("{top}{}", queues.concat()))
}

proptest! {
    #[test]
    fn headers_always_convert_to_valid_json(t in table()) {
        let v = headers::to_json(&t);
        let text = serde_json::to_string(&v).expect("serialisable");
        let back: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        prop_assert!(back.is_object());
    }

    #[test]
    fn header_ints_never_panic(t in table(), key in "[ -~]{0,20}") {
        let _ = headers::int(Some(&t), &key);
        let _ = headers::string(Some(&t), &key);
    }

    #[test]
    fn config_parser_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = config::parse(&text, Path::new("fuzz.toml"), None);
    }

    #[test]
    fn config_parser_never_panics_on_odd_values(text in config_text()) {
        match config::parse(&text, Path::new("fuzz.toml"), None) {
            Ok(cfg) => {
                for q in &cfg.queues {
                    prop_assert!(q.concurrency >= 1);
                    prop_assert!(!q.command.is_empty());
                    prop_assert!(q.policy.max_attempts >= 1);
                    prop_assert!(!q.policy.backoff.is_empty());
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("fuzz.toml")),
        }
    }

    #[test]
    fn durations_round_trip(ms in 1u64..10_000_000_000) {
        let d = std::time::Duration::from_millis(ms);
        let text = config::format_duration(d);
        prop_assert_eq!(config::parse_duration(&text).unwrap(), d);
    }
}
