//! Arbitrary bytes through the CBOR decoder that every HTTP envelope goes through, then through the
//! representation-independent hash (request ids, delegation hashes). Neither may panic, overflow
//! the stack or allocate without bound, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openic_crypto::request_id::{decode_cbor_value, hash_of_map, hash_value, request_id};
use serde_cbor::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = decode_cbor_value(data) else {
        return;
    };
    let _ = hash_value(&value, "fuzz");
    if let Value::Map(map) = &value {
        let by_id = request_id(map);
        let by_map = hash_of_map(map);
        // The request id is defined as the hash of the content map: both must agree.
        match (by_id, by_map) {
            (Ok(id), Ok(hash)) => assert_eq!(id.0, hash),
            (Err(_), Err(_)) => {}
            (id, hash) => panic!("request_id {id:?} and hash_of_map {hash:?} disagree"),
        }
    }
});
