//! `large`: a canister whose module is larger than 2 MiB (it embeds 2.5 MiB of pseudo-random data), so that
//! ic-utils installs it with `upload_chunk` + `install_chunked_code`. `checksum` reads every byte, so the data
//! cannot be optimised away.

#[path = "../pseudo_random.rs"]
#[allow(dead_code)]
mod pseudo_random;

static DATA: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/large_data.bin"));

/// FNV-1a over the embedded data (`black_box` keeps the compiler from evaluating it at build time).
#[ic_cdk::query]
fn checksum() -> u64 {
    pseudo_random::checksum(std::hint::black_box(DATA))
}

/// The number of embedded bytes.
#[ic_cdk::query]
fn data_len() -> u64 {
    DATA.len() as u64
}
