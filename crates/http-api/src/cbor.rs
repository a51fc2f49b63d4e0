//! CBOR response bodies: self-describing (tag 55799), built from `serde_cbor::Value` maps with text
//! keys and no floats.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_cbor::Value;

/// Media type of every CBOR body.
pub(crate) const CBOR_CONTENT_TYPE: &str = "application/cbor";

/// Encodes `value` with the self-describe tag.
pub(crate) fn encode(value: &Value) -> Vec<u8> {
    let mut serializer = serde_cbor::Serializer::new(Vec::new());
    // Writing into a Vec cannot fail, and a Value built in code always serialises.
    if serializer.self_describe().is_err() || value.serialize(&mut serializer).is_err() {
        unreachable!("serialising a serde_cbor::Value into a Vec cannot fail");
    }
    serializer.into_inner()
}

/// A CBOR response with `status`.
pub(crate) fn response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CBOR_CONTENT_TYPE)],
        encode(value),
    )
        .into_response()
}

/// Shorthand: a text-keyed map value.
pub(crate) fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Map(openic_crypto::request_id::text_map(entries))
}

/// Shorthand: a nat.
pub(crate) fn nat(n: u64) -> Value {
    Value::Integer(i128::from(n))
}

/// Shorthand: text.
pub(crate) fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

/// Shorthand: bytes.
pub(crate) fn bytes(b: &[u8]) -> Value {
    Value::Bytes(b.to_vec())
}
