//! Arbitrary bytes as a `Dispatch` or a `Notice` in JSON: parsing never panics, and whatever parses
//! serializes and parses back to the same value.
#![no_main]

use broker_dispatch::fsm::Dispatch;
use broker_dispatch::transport::Notice;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Equality of JSON trees, allowing floats to differ by a few ulps: serde_json without its
/// `float_roundtrip` feature may misread long decimals slightly, which is not this crate's to fix.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= x.abs().max(y.abs()) * 8.0 * f64::EPSILON
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = serde_json::from_slice::<Dispatch>(data) {
        let text = serde_json::to_vec(&d).expect("a parsed dispatch serializes");
        let back: Dispatch = serde_json::from_slice(&text).expect("a serialized dispatch parses");
        let (a, b) = (
            serde_json::to_value(&d).unwrap(),
            serde_json::to_value(&back).unwrap(),
        );
        assert!(same(&a, &b), "round trip changed {a} into {b}");
        // The fields without floats must survive exactly.
        assert_eq!(
            (d.id, &d.broker, d.state, d.attempt),
            (back.id, &back.broker, back.state, back.attempt)
        );
        assert_eq!(
            (&d.claimed_by, d.lease_until, &d.failure),
            (&back.claimed_by, back.lease_until, &back.failure)
        );
        assert_eq!(d.result.is_some(), back.result.is_some());
    }
    if let Ok(n) = serde_json::from_slice::<Notice>(data) {
        let text = serde_json::to_vec(&n).expect("a parsed notice serializes");
        assert_eq!(
            serde_json::from_slice::<Notice>(&text).expect("a serialized notice parses"),
            n
        );
    }
});
