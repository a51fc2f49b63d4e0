//! The leaves and small subtrees of the state tree, encoded as the interface specification says
//! (section "The system state tree") and as the mainnet replica does.

use crate::tree::Node;
use openic_replicated_state::CanisterState;
use openic_types::ids::CanisterIdRange;
use openic_types::{CanisterId, IngressState, IngressStatus, Principal};
use serde::Serialize;
use serde_bytes::ByteBuf;

/// At most this many ranges go into one leaf of `/canister_ranges/<subnet>/<shard>` (the mainnet
/// replica's `MAX_RANGES_PER_ROUTING_TABLE_LEAF`).
pub const MAX_RANGES_PER_SHARD: usize = 5;

/// A natural number as the spec encodes it in leaves: unsigned LEB128.
pub fn leb128(value: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(10);
    // Writing to a Vec cannot fail.
    let _ = leb128::write::unsigned(&mut bytes, value);
    bytes
}

/// CBOR with the self-describe tag 55799 in front, for values that cannot fail to serialise
/// (byte strings, arrays of them).
fn tagged_cbor(value: &impl Serialize) -> Vec<u8> {
    let mut serializer = serde_cbor::Serializer::new(Vec::new());
    // Serialising byte strings and arrays into a Vec cannot fail.
    let _ = serializer.self_describe();
    let _ = value.serialize(&mut serializer);
    serializer.into_inner()
}

/// `/canister/<id>/controllers`: `55799([* principal-bytes])`.
pub fn encode_controllers<'a>(controllers: impl IntoIterator<Item = &'a Principal>) -> Vec<u8> {
    let list: Vec<ByteBuf> = controllers
        .into_iter()
        .map(|principal| ByteBuf::from(principal.as_slice().to_vec()))
        .collect();
    tagged_cbor(&list)
}

/// Canister ranges: `55799([[low-bytes, high-bytes], …])`, closed intervals.
pub fn encode_canister_ranges(ranges: &[CanisterIdRange]) -> Vec<u8> {
    let list: Vec<(ByteBuf, ByteBuf)> = ranges
        .iter()
        .map(|range| {
            (
                ByteBuf::from(range.start.get().as_slice().to_vec()),
                ByteBuf::from(range.end.get().as_slice().to_vec()),
            )
        })
        .collect();
    tagged_cbor(&list)
}

/// The figures certified under `/subnet/<id>/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubnetMetrics {
    /// Canisters on the subnet.
    pub num_canisters: u64,
    /// Bytes of canister state (memories and modules).
    pub canister_state_bytes: u64,
    /// Cycles consumed since the subnet was created.
    pub consumed_cycles_total: u128,
    /// Update transactions processed since the subnet was created.
    pub update_transactions_total: u64,
}

/// `/subnet/<id>/metrics`, encoded like the mainnet replica: "packed" CBOR, where field names are
/// replaced by their indices, `{0: num_canisters, 1: canister_state_bytes,
/// 2: {0: low, 1: high (only if non-zero)}, 3: update_transactions_total}`, untagged.
pub fn encode_subnet_metrics(metrics: &SubnetMetrics) -> Vec<u8> {
    #[derive(Serialize)]
    struct Cycles {
        low: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        high: Option<u64>,
    }
    #[derive(Serialize)]
    struct Metrics {
        num_canisters: u64,
        canister_state_bytes: u64,
        consumed_cycles_total: Cycles,
        update_transactions_total: u64,
    }
    let high = (metrics.consumed_cycles_total >> 64) as u64;
    let value = Metrics {
        num_canisters: metrics.num_canisters,
        canister_state_bytes: metrics.canister_state_bytes,
        consumed_cycles_total: Cycles {
            low: metrics.consumed_cycles_total as u64,
            high: (high != 0).then_some(high),
        },
        update_transactions_total: metrics.update_transactions_total,
    };
    // Serialising plain integers into a Vec cannot fail.
    serde_cbor::ser::to_vec_packed(&value).unwrap_or_default()
}

/// The subtree `/request_status/<id>`: `status` plus `reply`, or `reject_code`, `reject_message`
/// and `error_code`, depending on the state.
pub fn request_status_tree(status: &IngressStatus) -> Node {
    let text = |value: &str| Node::leaf(value.as_bytes().to_vec());
    let state = &status.state;
    let status_leaf = text(state.status_text());
    match state {
        IngressState::Replied(reply) => Node::map([
            ("reply", Node::leaf(reply.clone())),
            ("status", status_leaf),
        ]),
        IngressState::Rejected(error) => {
            let mut entries = vec![
                (
                    "reject_code",
                    Node::leaf(leb128(error.code.for_user().as_u64())),
                ),
                ("reject_message", text(&error.message)),
                ("status", status_leaf),
            ];
            if let Some(code) = error.error_code {
                entries.push(("error_code", text(code.as_str())));
            }
            Node::map(entries)
        }
        IngressState::Received | IngressState::Processing | IngressState::Done => {
            Node::map([("status", status_leaf)])
        }
    }
}

/// The subtree `/canister/<id>`: `controllers` always; `certified_data`, `metadata/<name>` and
/// `module_hash` only once a module is installed (as on mainnet). Metadata holds both
/// `icp:public` and `icp:private` sections under their bare names; who may read them is decided
/// by the HTTP layer (see `CertifiedStateReader::metadata_visibility`).
pub fn canister_tree(canister: &CanisterState) -> Node {
    let system = &canister.system_state;
    let controllers = Node::leaf(encode_controllers(&system.controllers));
    match &canister.execution_state {
        None => Node::map([("controllers", controllers)]),
        Some(execution) => {
            let info = &execution.module_info;
            let metadata = Node::map(
                info.private_metadata
                    .iter()
                    .chain(info.public_metadata.iter())
                    .map(|(name, content)| (name.as_bytes(), Node::leaf(content.clone()))),
            );
            Node::map([
                ("certified_data", Node::leaf(system.certified_data.clone())),
                ("controllers", controllers),
                ("metadata", metadata),
                (
                    "module_hash",
                    Node::leaf(execution.wasm_binary.module_hash.to_vec()),
                ),
            ])
        }
    }
}

/// Whether the parts of a canister that the state tree shows are the same in `a` and `b`.
pub fn same_canister_tree(a: &CanisterState, b: &CanisterState) -> bool {
    if a.system_state.controllers != b.system_state.controllers
        || a.system_state.certified_data != b.system_state.certified_data
    {
        return false;
    }
    match (&a.execution_state, &b.execution_state) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.wasm_binary.module_hash == b.wasm_binary.module_hash
                && (std::sync::Arc::ptr_eq(&a.module_info, &b.module_info)
                    || (a.module_info.public_metadata == b.module_info.public_metadata
                        && a.module_info.private_metadata == b.module_info.private_metadata))
        }
        _ => false,
    }
}

/// Bytes of state a canister holds, for the subnet metrics: its memories and its module.
pub fn canister_state_bytes(canister: &CanisterState) -> u64 {
    canister.execution_state.as_ref().map_or(0, |execution| {
        let pages = execution
            .wasm_memory_size_pages
            .saturating_add(execution.stable_memory_size_pages);
        pages
            .saturating_mul(openic_replicated_state::WASM_PAGE_SIZE)
            .saturating_add(execution.wasm_binary.bytes.len() as u64)
    })
}

/// The shards of `/canister_ranges/<subnet>`: consecutive groups of at most
/// [`MAX_RANGES_PER_SHARD`] ranges, each labelled by the first id it contains. A subnet without
/// ranges gets one empty shard labelled with canister id 0, as on mainnet.
pub fn canister_range_shards(ranges: &[CanisterIdRange]) -> Vec<(CanisterId, Vec<u8>)> {
    if ranges.is_empty() {
        return vec![(CanisterId::from_u64(0), encode_canister_ranges(&[]))];
    }
    ranges
        .chunks(MAX_RANGES_PER_SHARD)
        .map(|chunk| (chunk[0].start, encode_canister_ranges(chunk)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use openic_types::{ErrorCode, RejectCode, Time, UserError};

    #[test]
    fn controllers_and_ranges_decode_like_the_agent_does() {
        let a = Principal::from_slice(&[1, 2, 3]);
        let b = Principal::anonymous();
        let bytes = encode_controllers([&a, &b]);
        assert_eq!(&bytes[..3], &[0xd9, 0xd9, 0xf7]);
        let decoded: Vec<Principal> = serde_cbor::from_slice(&bytes).unwrap();
        assert_eq!(decoded, vec![a, b]);

        let ranges = openic_types::ids::subnet_canister_ranges();
        let bytes = encode_canister_ranges(&ranges);
        assert_eq!(&bytes[..3], &[0xd9, 0xd9, 0xf7]);
        let decoded: Vec<(Principal, Principal)> = serde_cbor::from_slice(&bytes).unwrap();
        assert_eq!(decoded.len(), ranges.len());
        assert_eq!(decoded[1], (ranges[1].start.get(), ranges[1].end.get()));
    }

    #[test]
    fn metrics_decode_with_the_transport_types() {
        let metrics = SubnetMetrics {
            num_canisters: 3,
            canister_state_bytes: 1 << 20,
            consumed_cycles_total: (7u128 << 64) | 9,
            update_transactions_total: 42,
        };
        let decoded: ic_transport_types::SubnetMetrics =
            serde_cbor::from_slice(&encode_subnet_metrics(&metrics)).unwrap();
        assert_eq!(decoded.num_canisters, 3);
        assert_eq!(decoded.canister_state_bytes, 1 << 20);
        assert_eq!(decoded.consumed_cycles_total, (7u128 << 64) | 9);
        assert_eq!(decoded.update_transactions_total, 42);
        // Mainnet's packed form: a map with integer keys, `high` left out when zero.
        let small = encode_subnet_metrics(&SubnetMetrics {
            consumed_cycles_total: 5,
            ..SubnetMetrics::default()
        });
        assert_eq!(hex::encode(small), "a40000010002a100050300");
    }

    #[test]
    fn reject_status_uses_user_codes_and_leb128() {
        let status = IngressStatus {
            state: IngressState::Rejected(UserError {
                code: RejectCode::SysUnknown,
                message: "gone".into(),
                error_code: Some(ErrorCode::DeadlineExpired),
            }),
            sender: Principal::anonymous(),
            effective_canister_id: CanisterId::from_u64(1),
            ingress_expiry: Time(0),
        };
        let Node::Map(map) = request_status_tree(&status) else {
            panic!("a status is a map")
        };
        let labels: Vec<&[u8]> = map.iter().map(|(label, _)| label).collect();
        assert_eq!(
            labels,
            vec![
                b"error_code".as_ref(),
                b"reject_code",
                b"reject_message",
                b"status"
            ]
        );
        let Some(Node::Leaf(code)) = map.get(b"reject_code") else {
            panic!("reject_code is a leaf")
        };
        assert_eq!(&**code, &[2]);
        assert_eq!(leb128(300), vec![0xac, 0x02]);
    }
}
