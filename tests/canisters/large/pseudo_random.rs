// The bulk data of the `large` test canister, shared by its build script and by the Rust tests (which
// recompute the expected checksum): deterministic pseudo-random bytes, so the module does not compress away.

/// How many bytes the `large` canister embeds: 2.5 MiB, so its module is above the 2 MiB message limit and
/// ic-utils must install it in chunks.
pub const LARGE_DATA_BYTES: usize = 5 * 512 * 1024;

/// `len` bytes from a fixed-seed xorshift64* generator.
pub fn large_data(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let take = (len - bytes.len()).min(8);
        bytes.extend_from_slice(&word.to_le_bytes()[..take]);
    }
    bytes
}

/// FNV-1a (64-bit) over `bytes`: what the canister's `checksum` query returns.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    hash
}
