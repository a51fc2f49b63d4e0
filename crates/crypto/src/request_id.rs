//! The representation-independent hash of the IC interface spec ("hash of map", request ids),
//! computed generically over decoded CBOR.
//!
//! Why generic: clients add content fields over time (`sender_info`, a delegation's
//! `permissions`), and the sender's signature covers whatever they sent. Hashing the map as it was
//! received, field by field, keeps us in agreement with every client version without knowing the
//! fields in advance.
//!
//! Rules: blob → `H(bytes)`; text → `H(utf8)`; nat → `H(unsigned LEB128)`; negative int →
//! `H(signed LEB128)`; array → `H(concat(hash(e)))`; map → `H(concat(sort(H(key) · hash(value))))`.
//! Floats, booleans and null have no hashing rule and are refused, as are non-text map keys and
//! (at decode time, see [`decode_cbor_value`]) duplicate keys.

use openic_types::RequestId;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_cbor::Value;
use sha2::{Digest, Sha256};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;

/// Deepest nesting of arrays and maps that [`hash_value`] accepts (the IC's own messages nest at
/// most five levels: envelope, content, `paths`, path, label).
pub const MAX_HASH_DEPTH: usize = 32;

/// Most elements (array items or map entries) in one CBOR array or map that
/// [`decode_cbor_value`] accepts. The largest real one is a `read_state` request's `paths` (at
/// most 1,000) or a delegation's `targets`.
pub const MAX_CBOR_CONTAINER_ELEMENTS: usize = 10_000;

/// Most values in total (scalars and containers, at every level) in one document that
/// [`decode_cbor_value`] accepts: each one-byte CBOR item becomes a 32-byte-plus [`Value`], so this
/// bounds the memory a request body can make the decoder allocate.
pub const MAX_CBOR_VALUES: usize = 200_000;

/// Why a CBOR value could not be hashed or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// A float appeared; the IC's hashing has no rule for floats.
    #[error("field `{0}` holds a float; the IC request format has no floats")]
    Float(String),
    /// A boolean appeared.
    #[error("field `{0}` holds a boolean; the IC request format has no booleans")]
    Bool(String),
    /// A null / undefined value appeared.
    #[error("field `{0}` holds null; leave optional fields out instead")]
    Null(String),
    /// A map key that is not text.
    #[error("a map key in `{0}` is not text; IC request maps have text keys only")]
    NonTextKey(String),
    /// The same key twice in one map.
    #[error("duplicate map key `{0}`; each field may appear once")]
    DuplicateKey(String),
    /// Nesting deeper than [`MAX_HASH_DEPTH`].
    #[error("values are nested more than {MAX_HASH_DEPTH} levels deep")]
    TooDeep,
    /// An array or map with more than [`MAX_CBOR_CONTAINER_ELEMENTS`] elements.
    #[error(
        "a CBOR array or map has more than {MAX_CBOR_CONTAINER_ELEMENTS} elements; IC requests never need that many"
    )]
    TooManyElements,
    /// More than [`MAX_CBOR_VALUES`] values in one document.
    #[error(
        "the CBOR document holds more than {MAX_CBOR_VALUES} values; IC requests never need that many"
    )]
    TooManyValues,
    /// The bytes are not CBOR.
    #[error("malformed CBOR: {0}")]
    MalformedCbor(String),
    /// The value that should be a map is something else.
    #[error("expected a CBOR map")]
    NotAMap,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Unsigned LEB128, shortest form.
pub fn leb128_unsigned(mut value: u128) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Signed LEB128, shortest form.
pub fn leb128_signed(mut value: i128) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        let sign_bit_clear = byte & 0x40 == 0;
        if (value == 0 && sign_bit_clear) || (value == -1 && !sign_bit_clear) {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// The representation-independent hash of one value. `field` names the value in error messages.
pub fn hash_value(value: &Value, field: &str) -> Result<[u8; 32], HashError> {
    hash_value_at(value, field, 0)
}

fn hash_value_at(value: &Value, field: &str, depth: usize) -> Result<[u8; 32], HashError> {
    if depth > MAX_HASH_DEPTH {
        return Err(HashError::TooDeep);
    }
    match value {
        Value::Bytes(bytes) => Ok(sha256(bytes)),
        Value::Text(text) => Ok(sha256(text.as_bytes())),
        Value::Integer(n) if *n >= 0 => Ok(sha256(&leb128_unsigned(*n as u128))),
        Value::Integer(n) => Ok(sha256(&leb128_signed(*n))),
        Value::Array(items) => {
            let mut hasher = Sha256::new();
            for item in items {
                hasher.update(hash_value_at(item, field, depth + 1)?);
            }
            Ok(hasher.finalize().into())
        }
        Value::Map(map) => hash_of_map_at(map, field, depth + 1),
        // Without serde_cbor's `tags` feature tags never reach a `Value`; with it, hash the
        // tagged content (tag 55799 only marks the encoding).
        Value::Tag(_, inner) => hash_value_at(inner, field, depth + 1),
        Value::Float(_) => Err(HashError::Float(field.to_string())),
        Value::Bool(_) => Err(HashError::Bool(field.to_string())),
        Value::Null => Err(HashError::Null(field.to_string())),
        _ => Err(HashError::MalformedCbor(format!(
            "unsupported value in `{field}`"
        ))),
    }
}

/// `hash_of_map`: the hash of a map with text keys (request contents, delegations, query responses).
pub fn hash_of_map(map: &BTreeMap<Value, Value>) -> Result<[u8; 32], HashError> {
    hash_of_map_at(map, "", 0)
}

fn hash_of_map_at(
    map: &BTreeMap<Value, Value>,
    parent: &str,
    depth: usize,
) -> Result<[u8; 32], HashError> {
    let mut pairs: Vec<[u8; 64]> = Vec::with_capacity(map.len());
    for (key, value) in map {
        let Value::Text(key) = key else {
            return Err(HashError::NonTextKey(parent.to_string()));
        };
        let mut pair = [0u8; 64];
        pair[..32].copy_from_slice(&sha256(key.as_bytes()));
        pair[32..].copy_from_slice(&hash_value_at(value, key, depth)?);
        pairs.push(pair);
    }
    pairs.sort_unstable();
    let mut hasher = Sha256::new();
    for pair in &pairs {
        hasher.update(pair);
    }
    Ok(hasher.finalize().into())
}

/// The request id of a `content` map: its `hash_of_map`.
pub fn request_id(content: &BTreeMap<Value, Value>) -> Result<RequestId, HashError> {
    hash_of_map(content).map(RequestId)
}

/// Decodes CBOR bytes (with or without the self-describe tag 55799) into a [`Value`], refusing
/// duplicate map keys anywhere (serde_cbor's own `Value` silently keeps the last one, which would
/// let a signed field and a read field differ), arrays and maps nested more than
/// [`MAX_HASH_DEPTH`] levels deep, containers with more than [`MAX_CBOR_CONTAINER_ELEMENTS`]
/// elements, and documents with more than [`MAX_CBOR_VALUES`] values.
pub fn decode_cbor_value(bytes: &[u8]) -> Result<Value, HashError> {
    let budget = Cell::new(MAX_CBOR_VALUES);
    let mut deserializer = serde_cbor::Deserializer::from_slice(bytes);
    let decoded = StrictSeed {
        depth: 0,
        budget: &budget,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value));
    decoded.map_err(|error| {
        let text = error.to_string();
        if let Some(key) = text.strip_prefix(DUPLICATE_KEY_MARKER) {
            HashError::DuplicateKey(key.to_string())
        } else if text.starts_with(TOO_DEEP_MARKER) {
            HashError::TooDeep
        } else if text.starts_with(TOO_MANY_ELEMENTS_MARKER) {
            HashError::TooManyElements
        } else if text.starts_with(TOO_MANY_VALUES_MARKER) {
            HashError::TooManyValues
        } else {
            HashError::MalformedCbor(text)
        }
    })
}

const DUPLICATE_KEY_MARKER: &str = "duplicate key: ";
const TOO_DEEP_MARKER: &str = "nesting too deep";
const TOO_MANY_ELEMENTS_MARKER: &str = "too many elements in one container";
const TOO_MANY_VALUES_MARKER: &str = "too many values in the document";

/// Decodes one value at nesting `depth`, charging it to the document's `budget` of values.
#[derive(Clone, Copy)]
struct StrictSeed<'a> {
    depth: usize,
    budget: &'a Cell<usize>,
}

impl<'de> DeserializeSeed<'de> for StrictSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        let Some(left) = self.budget.get().checked_sub(1) else {
            return Err(de::Error::custom(TOO_MANY_VALUES_MARKER));
        };
        self.budget.set(left);
        deserializer.deserialize_any(StrictVisitor(self))
    }
}

impl StrictSeed<'_> {
    /// The seed for the elements of a container opened at this seed's depth.
    fn nested<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= MAX_HASH_DEPTH {
            return Err(E::custom(TOO_DEEP_MARKER));
        }
        Ok(StrictSeed {
            depth: self.depth + 1,
            budget: self.budget,
        })
    }
}

fn count_element<E: de::Error>(count: &mut usize) -> Result<(), E> {
    *count += 1;
    if *count > MAX_CBOR_CONTAINER_ELEMENTS {
        return Err(E::custom(TOO_MANY_ELEMENTS_MARKER));
    }
    Ok(())
}

struct StrictVisitor<'a>(StrictSeed<'a>);

impl<'de> Visitor<'de> for StrictVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CBOR value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(i128::from(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Integer(i128::from(v)))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Integer)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(v.to_vec()))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let seed = self.0.nested()?;
        // Do not trust size hints from untrusted input for preallocation.
        let mut items = Vec::new();
        let mut count = 0;
        while let Some(item) = seq.next_element_seed(seed)? {
            count_element(&mut count)?;
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let seed = self.0.nested()?;
        let mut map = BTreeMap::new();
        let mut count = 0;
        while let Some((key, value)) = access.next_entry_seed(seed, seed)? {
            count_element(&mut count)?;
            if map.contains_key(&key) {
                let shown = match &key {
                    Value::Text(text) => text.clone(),
                    other => format!("{other:?}"),
                };
                return Err(de::Error::custom(format!("{DUPLICATE_KEY_MARKER}{shown}")));
            }
            map.insert(key, value);
        }
        Ok(Value::Map(map))
    }
}

/// A text-keyed CBOR map, for building values to hash in code (query responses, tests).
pub fn text_map<const N: usize>(entries: [(&str, Value); N]) -> BTreeMap<Value, Value> {
    entries
        .into_iter()
        .map(|(key, value)| (Value::Text(key.to_string()), value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_example() -> BTreeMap<Value, Value> {
        text_map([
            ("request_type", Value::Text("call".into())),
            ("sender", Value::Bytes(vec![0x04])),
            ("ingress_expiry", Value::Integer(1_685_570_400_000_000_000)),
            (
                "canister_id",
                Value::Bytes(vec![0, 0, 0, 0, 0, 0, 0x04, 0xD2]),
            ),
            ("method_name", Value::Text("hello".into())),
            ("arg", Value::Bytes(b"DIDL\x00\xFD*".to_vec())),
        ])
    }

    #[test]
    fn spec_request_id_vector() {
        let id = request_id(&spec_example()).unwrap();
        assert_eq!(
            hex::encode(id.0),
            "1d1091364d6bb8a6c16b203ee75467d59ead468f523eb058880ae8ec80e2b101"
        );
    }

    #[test]
    fn matches_ic_transport_types_for_calls_with_nonce_and_read_state() {
        use ic_transport_types::{EnvelopeContent, to_request_id};
        let call = EnvelopeContent::Call {
            nonce: Some(vec![1, 2, 3]),
            ingress_expiry: 1_700_000_000_123_456_789,
            sender: candid::Principal::anonymous(),
            canister_id: candid::Principal::from_slice(&[0, 0, 0, 0, 0, 0, 0, 7, 1, 1]),
            method_name: "greet".into(),
            arg: b"DIDL\x00\x00".to_vec(),
            sender_info: None,
        };
        let read_state = EnvelopeContent::ReadState {
            ingress_expiry: 300,
            sender: candid::Principal::anonymous(),
            paths: vec![
                vec![b"time".to_vec().into()],
                vec![b"request_status".to_vec().into(), vec![7u8; 32].into()],
            ],
        };
        for content in [call, read_state] {
            let bytes = serde_cbor::to_vec(&content).unwrap();
            let Value::Map(map) = decode_cbor_value(&bytes).unwrap() else {
                panic!("not a map")
            };
            assert_eq!(
                request_id(&map).unwrap().0,
                *to_request_id(&content).unwrap()
            );
        }
    }

    #[test]
    fn self_describe_tag_is_accepted() {
        let mut serializer = serde_cbor::Serializer::new(Vec::new());
        serializer.self_describe().unwrap();
        serde::Serialize::serialize(&Value::Map(spec_example()), &mut serializer).unwrap();
        let bytes = serializer.into_inner();
        assert_eq!(&bytes[..3], &[0xd9, 0xd9, 0xf7]);
        let Value::Map(map) = decode_cbor_value(&bytes).unwrap() else {
            panic!("not a map")
        };
        assert_eq!(map, spec_example());
    }

    #[test]
    fn refuses_duplicates_floats_bools_and_non_text_keys() {
        // {"a": 1, "a": 2}
        let duplicate = [0xa2, 0x61, b'a', 0x01, 0x61, b'a', 0x02];
        assert_eq!(
            decode_cbor_value(&duplicate),
            Err(HashError::DuplicateKey("a".into()))
        );
        let float = text_map([("x", Value::Float(1.5))]);
        assert_eq!(hash_of_map(&float), Err(HashError::Float("x".into())));
        let boolean = text_map([("y", Value::Bool(true))]);
        assert_eq!(hash_of_map(&boolean), Err(HashError::Bool("y".into())));
        let mut non_text = BTreeMap::new();
        non_text.insert(Value::Integer(1), Value::Integer(2));
        assert!(matches!(
            hash_of_map(&non_text),
            Err(HashError::NonTextKey(_))
        ));
        assert!(matches!(
            decode_cbor_value(&[0xff, 0x00]),
            Err(HashError::MalformedCbor(_))
        ));
    }

    #[test]
    fn leb128_encodings() {
        assert_eq!(leb128_unsigned(0), vec![0]);
        assert_eq!(leb128_unsigned(624_485), vec![0xe5, 0x8e, 0x26]);
        assert_eq!(leb128_signed(-123_456), vec![0xc0, 0xbb, 0x78]);
        assert_eq!(leb128_signed(63), vec![0x3f]);
        assert_eq!(leb128_signed(64), vec![0xc0, 0x00]);
        assert_eq!(leb128_signed(-1), vec![0x7f]);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut value = Value::Bytes(vec![]);
        for _ in 0..(MAX_HASH_DEPTH + 2) {
            value = Value::Array(vec![value]);
        }
        assert_eq!(hash_value(&value, "paths"), Err(HashError::TooDeep));
    }

    #[test]
    fn decoding_refuses_huge_containers_deep_nesting_and_too_many_values() {
        let array = |n: usize| Value::Array(vec![Value::Integer(0); n]);
        let encode = |value: &Value| serde_cbor::to_vec(value).unwrap();
        assert!(decode_cbor_value(&encode(&array(MAX_CBOR_CONTAINER_ELEMENTS))).is_ok());
        assert_eq!(
            decode_cbor_value(&encode(&array(MAX_CBOR_CONTAINER_ELEMENTS + 1))),
            Err(HashError::TooManyElements)
        );
        let big_map: BTreeMap<Value, Value> = (0..=MAX_CBOR_CONTAINER_ELEMENTS)
            .map(|i| (Value::Text(i.to_string()), Value::Integer(0)))
            .collect();
        assert_eq!(
            decode_cbor_value(&encode(&Value::Map(big_map))),
            Err(HashError::TooManyElements)
        );
        // Many containers, each within the limit, together over the document's budget.
        let many = Value::Array(vec![array(9_999); MAX_CBOR_VALUES / 9_999 + 1]);
        assert_eq!(
            decode_cbor_value(&encode(&many)),
            Err(HashError::TooManyValues)
        );
        let nested = |levels: usize| {
            let mut value = Value::Bytes(vec![]);
            for _ in 0..levels {
                value = Value::Array(vec![value]);
            }
            value
        };
        assert!(decode_cbor_value(&encode(&nested(MAX_HASH_DEPTH))).is_ok());
        assert_eq!(
            decode_cbor_value(&encode(&nested(MAX_HASH_DEPTH + 1))),
            Err(HashError::TooDeep)
        );
        // Trailing bytes after the document are malformed, not ignored.
        let mut trailing = encode(&array(1));
        trailing.push(0);
        assert!(matches!(
            decode_cbor_value(&trailing),
            Err(HashError::MalformedCbor(_))
        ));
    }
}
