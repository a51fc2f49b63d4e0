//! A block-log segment with arbitrary contents, opened and read by `FileBlockLog`: it must answer
//! `Ok` or an error, never panic or allocate without bound.
//!
//! Input: the first byte picks the layout, the rest is the content.
//! - even: the content is the whole segment file, as is (exercises the magic and record headers;
//!   records with valid checksums are rare).
//! - odd: the content is split into record payloads at each `0xFF 0xFE` pair, and each is framed
//!   with correct lengths and checksums behind the magic (exercises the block decoding and height
//!   checks behind the checksums). An optional trailing raw tail follows the last `0xFF 0xFD`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openic_interfaces::BlockLog as _;
use openic_state_manager::block_log::SEGMENT_MAGIC;
use openic_state_manager::{BlockLogConfig, FileBlockLog};
use openic_types::Height;

/// Small limits, so that a record length near the limit is cheap and a roll is reachable.
fn config() -> BlockLogConfig {
    BlockLogConfig {
        segment_max_bytes: 64 * 1024,
        record_max_bytes: 1024 * 1024,
    }
}

fn framed(content: &[u8]) -> Vec<u8> {
    let (records, tail) = match content.windows(2).position(|w| w == [0xFF, 0xFD]) {
        Some(at) => (&content[..at], &content[at + 2..]),
        None => (content, &[][..]),
    };
    let mut file = SEGMENT_MAGIC.to_vec();
    let mut rest = records;
    loop {
        let (payload, next) = match rest.windows(2).position(|w| w == [0xFF, 0xFE]) {
            Some(at) => (&rest[..at], Some(&rest[at + 2..])),
            None => (rest, None),
        };
        let mut header = Vec::with_capacity(12);
        header.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        let header_crc = crc32fast::hash(&header);
        header.extend_from_slice(&header_crc.to_le_bytes());
        file.extend_from_slice(&header);
        file.extend_from_slice(payload);
        match next {
            Some(next) => rest = next,
            None => break,
        }
    }
    file.extend_from_slice(tail);
    file
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, content)) = data.split_first() else {
        return;
    };
    let file = if mode % 2 == 0 {
        content.to_vec()
    } else {
        framed(content)
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let blocks = dir.path().join("blocks");
    std::fs::create_dir(&blocks).expect("blocks dir");
    // Segments are named after their first height (20 digits); start at 1 like a fresh log.
    std::fs::write(blocks.join(format!("{:020}.blocks", 1)), &file).expect("write segment");
    let Ok(mut log) = FileBlockLog::open(dir.path(), config()) else {
        return;
    };
    let last = log.last_height();
    let read = log.read_after(Height(0));
    if let (Ok(blocks), Some(last)) = (&read, last) {
        assert_eq!(
            blocks.last().map(|b| b.height),
            Some(last),
            "read_after disagrees with last_height"
        );
    }
    // Reopening what open repaired must succeed and find the same blocks.
    drop(log);
    let reopened = FileBlockLog::open(dir.path(), config()).expect("reopening a repaired log");
    assert_eq!(
        reopened.last_height(),
        last,
        "reopen found different blocks"
    );
});
