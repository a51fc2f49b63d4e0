//! The block the BFT engine agrees on, and its canonical encoding.

use bytes::BufMut;
use commonware_codec::{
    Buf, Encode, EncodeSize, Error as CodecError, RangeCfg, Read, ReadExt as _, Write,
};
use commonware_consensus::{
    BoundedBlock, Heightable, simplex::scheme::bls12381_threshold::vrf::Seed, types::Height,
};
use commonware_cryptography::{
    Committable, Digestible, Hasher as _,
    bls12381::primitives::variant::MinSig,
    sha256::{Digest, Sha256},
};

/// Bytes of an encoded seed at most: round (two varints of at most 10 bytes) and a MinSig
/// signature (48 bytes).
const SEED_ENCODED_BYTES_MAX: usize = 10 + 10 + 48;

/// Bytes of an encoded varint length prefix at most (lengths are `usize` encoded as `u32`).
const LENGTH_PREFIX_BYTES_MAX: usize = 5;

/// Limits every decoder of a block applies, so a peer cannot make us allocate or store more
/// than the subnet agreed a block may hold.
///
/// Every replica of a subnet must use the same limits, and the limits must never decrease while
/// stored blocks remain (marshal re-reads stored blocks with them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLimits {
    /// Most ingress messages in one block.
    pub ingress_messages_max: usize,
    /// Most bytes of ingress (sum of message lengths) in one block.
    pub ingress_bytes_max: usize,
}

/// A block of opaque ingress messages at one height.
///
/// `parent_seed` is the threshold-VRF seed of the round in which the parent was proposed
/// (absent only when the parent is genesis). Blocks carry seeds so that every replica, including
/// one that catches up from storage or peers, reads the same randomness from the finalized chain;
/// see [`crate::bft::SEED_LAG_HEIGHTS`] for which seed a height executes with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Block {
    parent: Digest,
    height: u64,
    time_nanos: u64,
    parent_seed: Option<Seed<MinSig>>,
    ingress: Vec<Vec<u8>>,
    digest: Digest,
}

impl Block {
    /// Builds a block and computes its digest once.
    pub(crate) fn new(
        parent: Digest,
        height: u64,
        time_nanos: u64,
        parent_seed: Option<Seed<MinSig>>,
        ingress: Vec<Vec<u8>>,
    ) -> Self {
        let mut block = Self {
            parent,
            height,
            time_nanos,
            parent_seed,
            ingress,
            digest: Digest::from([0u8; 32]),
        };
        block.digest = Sha256::hash(&[block.encode().as_ref()]);
        block
    }

    /// The genesis block every replica of a subnet starts from: height 0, no ingress.
    pub(crate) fn genesis(time_nanos: u64) -> Self {
        Self::new(Digest::from([0u8; 32]), 0, time_nanos, None, Vec::new())
    }

    /// The height (genesis is 0).
    pub(crate) fn height_u64(&self) -> u64 {
        self.height
    }

    /// The block time in nanoseconds since the Unix epoch; strictly greater than the parent's.
    pub(crate) fn time_nanos(&self) -> u64 {
        self.time_nanos
    }

    /// The seed of the parent's round, if the parent is not genesis.
    pub(crate) fn parent_seed(&self) -> Option<&Seed<MinSig>> {
        self.parent_seed.as_ref()
    }

    /// The opaque ingress messages, in proposal order.
    pub(crate) fn ingress(&self) -> &[Vec<u8>] {
        &self.ingress
    }

    /// Bytes of ingress in this block (sum of message lengths).
    pub(crate) fn ingress_bytes(&self) -> usize {
        self.ingress.iter().map(Vec::len).sum()
    }
}

impl Write for Block {
    fn write(&self, writer: &mut impl BufMut) {
        self.parent.write(writer);
        self.height.write(writer);
        self.time_nanos.write(writer);
        self.parent_seed.write(writer);
        self.ingress.write(writer);
    }
}

impl EncodeSize for Block {
    fn encode_size(&self) -> usize {
        self.parent.encode_size()
            + self.height.encode_size()
            + self.time_nanos.encode_size()
            + self.parent_seed.encode_size()
            + self.ingress.encode_size()
    }
}

impl Read for Block {
    type Cfg = BlockLimits;

    fn read_cfg(reader: &mut impl Buf, limits: &BlockLimits) -> Result<Self, CodecError> {
        let parent = Digest::read(reader)?;
        let height = u64::read(reader)?;
        let time_nanos = u64::read(reader)?;
        let parent_seed = Option::<Seed<MinSig>>::read_cfg(reader, &())?;
        let ingress = Vec::<Vec<u8>>::read_cfg(
            reader,
            &(
                RangeCfg::new(..=limits.ingress_messages_max),
                (RangeCfg::new(..=limits.ingress_bytes_max), ()),
            ),
        )?;
        let ingress_bytes: usize = ingress.iter().map(Vec::len).sum();
        if ingress_bytes > limits.ingress_bytes_max {
            return Err(CodecError::Invalid("Block", "ingress bytes over limit"));
        }
        Ok(Self::new(parent, height, time_nanos, parent_seed, ingress))
    }
}

impl Digestible for Block {
    type Digest = Digest;

    fn digest(&self) -> Digest {
        self.digest
    }
}

impl Committable for Block {
    type Commitment = Digest;

    fn commitment(&self) -> Digest {
        self.digest
    }
}

impl Heightable for Block {
    fn height(&self) -> Height {
        Height::new(self.height)
    }
}

impl commonware_consensus::Block for Block {
    fn parent(&self) -> Digest {
        self.parent
    }
}

impl BoundedBlock for Block {
    fn max_encode_size(limits: &BlockLimits) -> usize {
        32 + 8
            + 8
            + 1
            + SEED_ENCODED_BYTES_MAX
            + LENGTH_PREFIX_BYTES_MAX
            + limits.ingress_messages_max * LENGTH_PREFIX_BYTES_MAX
            + limits.ingress_bytes_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commonware_codec::Decode as _;

    const LIMITS: BlockLimits = BlockLimits {
        ingress_messages_max: 4,
        ingress_bytes_max: 16,
    };

    #[test]
    fn encoding_round_trips_and_digest_is_hash_of_encoding() {
        let block = Block::new(
            Digest::from([7u8; 32]),
            3,
            99,
            None,
            vec![b"ab".to_vec(), b"c".to_vec()],
        );
        let bytes = block.encode();
        assert!(bytes.len() <= Block::max_encode_size(&LIMITS));
        let decoded = Block::decode_cfg(bytes.clone(), &LIMITS).expect("decodes");
        assert_eq!(decoded, block);
        assert_eq!(block.digest(), Sha256::hash(&[bytes.as_ref()]));
    }

    #[test]
    fn decoding_rejects_blocks_over_limits() {
        let too_many = Block::new(Digest::from([0u8; 32]), 1, 1, None, vec![vec![1]; 5]);
        assert!(Block::decode_cfg(too_many.encode(), &LIMITS).is_err());
        let too_big = Block::new(Digest::from([0u8; 32]), 1, 1, None, vec![vec![1; 9]; 2]);
        assert!(Block::decode_cfg(too_big.encode(), &LIMITS).is_err());
    }
}
