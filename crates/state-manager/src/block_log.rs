//! [`FileBlockLog`]: the durable, append-only log of finalized blocks.
//!
//! # Format
//!
//! `<state_dir>/blocks/` holds segment files named `<first height, 20 digits>.blocks`. A segment
//! starts with the 8-byte magic [`SEGMENT_MAGIC`] and then holds records, one block each, at
//! consecutive heights:
//!
//! ```text
//! length u32 LE | payload CRC32 u32 LE | header CRC32 u32 LE (of the previous 8 bytes) | payload
//! ```
//!
//! where the payload is the serde_cbor encoding of an `openic_types::Block`. The header has its own
//! checksum so a damaged length is recognised as damage rather than trusted.
//!
//! # Torn tails
//!
//! A crash during `append` can leave the last record of the last segment incomplete: the file ends
//! inside it, or the filesystem extended the file with zeros that were never overwritten. Such a
//! tail never held a durable block (append returns only after fsync), so it is truncated and
//! ignored. Damage anywhere else, or a bad record followed by more data, is
//! [`StorageError::Corrupt`]: the log cannot tell which blocks were lost, so the node must stop.

use crate::fs_util::{corrupt, create_dir_durably, invalid_input, io_error, sync_dir};
use openic_interfaces::{BlockLog, StorageError};
use openic_types::{Block, Height};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// The first 8 bytes of every segment file (format name and version).
pub const SEGMENT_MAGIC: [u8; 8] = *b"OICBLK01";

/// Bytes of the segment header.
const SEGMENT_HEADER_BYTES: u64 = SEGMENT_MAGIC.len() as u64;

/// Bytes of a record header: length, payload CRC32, header CRC32.
const RECORD_HEADER_BYTES: u64 = 12;

/// File name extension of segments.
const SEGMENT_EXTENSION: &str = "blocks";

/// Limits of the block log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLogConfig {
    /// A new segment is started once the current one reaches this size (and after every
    /// [`BlockLog::truncate_through`], so segments end at checkpoints and can be deleted whole).
    pub segment_max_bytes: u64,
    /// Largest encoded block accepted by `append` and trusted when reading. A stored length above
    /// it is treated as damage, never allocated.
    pub record_max_bytes: u32,
}

impl Default for BlockLogConfig {
    fn default() -> Self {
        BlockLogConfig {
            segment_max_bytes: 64 * 1024 * 1024,
            record_max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// One segment file and the heights it holds (always at least one block).
#[derive(Clone, Debug)]
struct Segment {
    path: PathBuf,
    first_height: Height,
    last_height: Height,
    bytes: u64,
}

/// The block log in `<state_dir>/blocks/`. See the module documentation for the format.
///
/// Invariants: segments on disk hold consecutive heights in file-name order, each segment holds at
/// least one block once `open` has returned, and every block `append` accepted is durable.
#[derive(Debug)]
pub struct FileBlockLog {
    dir: PathBuf,
    config: BlockLogConfig,
    segments: Vec<Segment>,
    /// The last segment, open for appending; `None` after a roll (the next append starts a new one).
    active: Option<File>,
    /// Height of the last block appended or found on disk (kept after truncation, so heights stay
    /// consecutive within one process even when the log is empty).
    last_height: Option<Height>,
    /// Set when an append failed part-way: the tail of the active segment is unknown, so further
    /// appends are refused until the node restarts and `open` repairs the tail.
    failed: bool,
}

/// What reading a segment found.
struct SegmentScan {
    last_height: Option<Height>,
    /// Bytes of the segment up to the end of the last good record.
    valid_bytes: u64,
    /// Bytes of the file as found.
    file_bytes: u64,
    /// Why the tail beyond `valid_bytes` was judged torn, if it was.
    torn_reason: Option<String>,
}

impl FileBlockLog {
    /// Opens (creating if needed) the block log under `<state_dir>/blocks/`, validates every
    /// record, and truncates a torn tail left by a crash during append.
    ///
    /// Errors: [`StorageError::Corrupt`] if any record other than a torn tail is damaged or heights
    /// are not consecutive; [`StorageError::Io`] if the directory cannot be read or written.
    pub fn open(state_dir: &Path, config: BlockLogConfig) -> Result<FileBlockLog, StorageError> {
        let dir = state_dir.join("blocks");
        create_dir_durably(&dir)?;
        let mut log = FileBlockLog {
            dir,
            config,
            segments: Vec::new(),
            active: None,
            last_height: None,
            failed: false,
        };
        let found = log.list_segment_files()?;
        let count = found.len();
        for (position, (path, first_height)) in found.into_iter().enumerate() {
            let is_last = position + 1 == count;
            let scan = log.scan_segment(&path, first_height, is_last, |_| {})?;
            let scan = log.repair_tail(&path, scan)?;
            match scan.last_height {
                Some(last_height) => {
                    if let Some(previous) = log.segments.last()
                        && previous.last_height.increment() != first_height
                    {
                        return Err(corrupt(
                            &path,
                            format!(
                                "segment starts at height {first_height} but the previous \
                                     segment ends at {}; blocks are missing from the log",
                                previous.last_height
                            ),
                        ));
                    }
                    log.segments.push(Segment {
                        path,
                        first_height,
                        last_height,
                        bytes: scan.valid_bytes,
                    });
                }
                None if is_last => {
                    // Created, but the crash came before its first block was durable.
                    tracing::warn!(path = %path.display(), "removing an empty block log segment");
                    std::fs::remove_file(&path).map_err(io_error(&path))?;
                    sync_dir(&log.dir)?;
                }
                None => {
                    return Err(corrupt(
                        &path,
                        "segment holds no blocks but is followed by other segments",
                    ));
                }
            }
        }
        log.last_height = log.segments.last().map(|s| s.last_height);
        if let Some(last) = log.segments.last()
            && last.bytes < log.config.segment_max_bytes
        {
            let file = OpenOptions::new()
                .append(true)
                .open(&last.path)
                .map_err(io_error(&last.path))?;
            log.active = Some(file);
        }
        Ok(log)
    }

    /// The height of the last block in the log, if any (also after the log was truncated empty in
    /// this process).
    pub fn last_height(&self) -> Option<Height> {
        self.last_height
    }

    /// The height of the first block still in the log, if any.
    pub fn first_height(&self) -> Option<Height> {
        self.segments.first().map(|s| s.first_height)
    }

    /// The segment files in the directory, sorted by first height.
    fn list_segment_files(&self) -> Result<Vec<(PathBuf, Height)>, StorageError> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!(path = %path.display(), "ignoring a file that is not a block log segment");
                continue;
            };
            match parse_segment_name(name) {
                Some(height) => found.push((path, height)),
                None => {
                    tracing::warn!(path = %path.display(), "ignoring a file that is not a block log segment")
                }
            }
        }
        found.sort_by_key(|(_, height)| *height);
        Ok(found)
    }

    /// Reads a segment, validating every record and calling `on_block` for each block in order.
    /// In the last segment a torn tail is reported in the result; anywhere else damage is an error.
    fn scan_segment(
        &self,
        path: &Path,
        first_height: Height,
        is_last: bool,
        mut on_block: impl FnMut(Block),
    ) -> Result<SegmentScan, StorageError> {
        let file = File::open(path).map_err(io_error(path))?;
        let file_bytes = file.metadata().map_err(io_error(path))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut scan = SegmentScan {
            last_height: None,
            valid_bytes: 0,
            file_bytes,
            torn_reason: None,
        };

        // A bad region at `offset`: torn if it is the tail of the last segment, else corrupt.
        let damaged = |reader: &mut BufReader<File>,
                       scan: &mut SegmentScan,
                       offset: u64,
                       reaches_end: bool,
                       reason: String|
         -> Result<(), StorageError> {
            if is_last && (reaches_end || rest_is_zero(reader).map_err(io_error(path))?) {
                scan.valid_bytes = offset;
                scan.torn_reason = Some(reason);
                Ok(())
            } else {
                Err(corrupt(path, format!("at byte {offset}: {reason}")))
            }
        };

        if file_bytes < SEGMENT_HEADER_BYTES {
            damaged(
                &mut reader,
                &mut scan,
                0,
                true,
                "the segment header is incomplete".to_string(),
            )?;
            return Ok(scan);
        }
        let mut magic = [0u8; SEGMENT_MAGIC.len()];
        reader.read_exact(&mut magic).map_err(io_error(path))?;
        if magic != SEGMENT_MAGIC {
            let zero = magic.iter().all(|b| *b == 0);
            let reason = "the file does not start with the block log magic OICBLK01".to_string();
            if zero {
                damaged(&mut reader, &mut scan, 0, false, reason)?;
                return Ok(scan);
            }
            return Err(corrupt(path, reason));
        }
        let mut offset = SEGMENT_HEADER_BYTES;
        scan.valid_bytes = offset;
        let mut expected_height = first_height;
        let mut payload = Vec::new();
        while offset < file_bytes {
            let remaining = file_bytes - offset;
            if remaining < RECORD_HEADER_BYTES {
                damaged(
                    &mut reader,
                    &mut scan,
                    offset,
                    true,
                    format!("incomplete record header ({remaining} bytes)"),
                )?;
                return Ok(scan);
            }
            let mut header = [0u8; RECORD_HEADER_BYTES as usize];
            reader.read_exact(&mut header).map_err(io_error(path))?;
            let length = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let payload_crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            let header_crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
            if crc32fast::hash(&header[0..8]) != header_crc {
                damaged(
                    &mut reader,
                    &mut scan,
                    offset,
                    false,
                    "record header checksum mismatch".to_string(),
                )?;
                return Ok(scan);
            }
            if length == 0 || length > self.config.record_max_bytes {
                return Err(corrupt(
                    path,
                    format!(
                        "at byte {offset}: record length {length} is outside 1..={} bytes",
                        self.config.record_max_bytes
                    ),
                ));
            }
            let end = offset + RECORD_HEADER_BYTES + u64::from(length);
            if end > file_bytes {
                damaged(
                    &mut reader,
                    &mut scan,
                    offset,
                    true,
                    format!("record of {length} bytes is cut off by the end of the file"),
                )?;
                return Ok(scan);
            }
            payload.resize(length as usize, 0);
            reader.read_exact(&mut payload).map_err(io_error(path))?;
            if crc32fast::hash(&payload) != payload_crc {
                damaged(
                    &mut reader,
                    &mut scan,
                    offset,
                    end == file_bytes,
                    "record payload checksum mismatch".to_string(),
                )?;
                return Ok(scan);
            }
            let block: Block = serde_cbor::from_slice(&payload).map_err(|e| {
                corrupt(
                    path,
                    format!(
                        "at byte {offset}: record checksums correctly but is not a block ({e}); \
                         was the log written by an incompatible openic version?"
                    ),
                )
            })?;
            if block.height != expected_height {
                return Err(corrupt(
                    path,
                    format!(
                        "at byte {offset}: block has height {} where height {expected_height} \
                         was expected",
                        block.height
                    ),
                ));
            }
            scan.last_height = Some(block.height);
            expected_height = block.height.increment();
            on_block(block);
            offset = end;
            scan.valid_bytes = offset;
        }
        Ok(scan)
    }

    /// Truncates a torn tail found by [`FileBlockLog::scan_segment`] and makes the truncation
    /// durable.
    fn repair_tail(&self, path: &Path, scan: SegmentScan) -> Result<SegmentScan, StorageError> {
        if let Some(reason) = &scan.torn_reason {
            tracing::warn!(
                path = %path.display(),
                valid_bytes = scan.valid_bytes,
                file_bytes = scan.file_bytes,
                reason = %reason,
                "truncating a torn block log tail left by a crash during append"
            );
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_error(path))?;
            file.set_len(scan.valid_bytes).map_err(io_error(path))?;
            file.sync_all().map_err(io_error(path))?;
        }
        Ok(scan)
    }

    /// Starts a new segment whose first block is at `height`.
    fn start_segment(&mut self, height: Height) -> Result<(), StorageError> {
        let path = self.dir.join(segment_name(height));
        let mut file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.write_all(&SEGMENT_MAGIC).map_err(io_error(&path))?;
        file.sync_all().map_err(io_error(&path))?;
        sync_dir(&self.dir)?;
        self.active = Some(file);
        self.segments.push(Segment {
            path,
            first_height: height,
            last_height: height,
            bytes: SEGMENT_HEADER_BYTES,
        });
        Ok(())
    }
}

impl BlockLog for FileBlockLog {
    fn append(&mut self, block: &Block) -> Result<(), StorageError> {
        if self.failed {
            return Err(invalid_input(
                &self.dir,
                "an earlier append to the block log failed; restart the node so the log's tail \
                 is checked and repaired"
                    .to_string(),
            ));
        }
        if let Some(last) = self.last_height
            && block.height != last.increment()
        {
            return Err(invalid_input(
                &self.dir,
                format!(
                    "block height {} does not follow the last logged height {last}",
                    block.height
                ),
            ));
        }
        let payload = serde_cbor::to_vec(block).map_err(|e| {
            invalid_input(
                &self.dir,
                format!("cannot encode block {}: {e}", block.height),
            )
        })?;
        let length = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= self.config.record_max_bytes)
            .ok_or_else(|| {
                invalid_input(
                    &self.dir,
                    format!(
                        "block {} encodes to {} bytes, above the block log's record limit of {} \
                         bytes; lower the block maker's ingress bytes per block",
                        block.height,
                        payload.len(),
                        self.config.record_max_bytes
                    ),
                )
            })?;

        let needs_new_segment = match (&self.active, self.segments.last()) {
            (Some(_), Some(segment)) => segment.bytes >= self.config.segment_max_bytes,
            _ => true,
        };
        if needs_new_segment {
            self.active = None;
            self.start_segment(block.height)?;
        }

        let mut record = Vec::with_capacity(RECORD_HEADER_BYTES as usize + payload.len());
        record.extend_from_slice(&length.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        let header_crc = crc32fast::hash(&record[0..8]);
        record.extend_from_slice(&header_crc.to_le_bytes());
        record.extend_from_slice(&payload);

        let segment = self
            .segments
            .last_mut()
            .expect("a segment was just ensured");
        let file = self.active.as_mut().expect("a segment was just ensured");
        let written = file.write_all(&record).and_then(|()| file.sync_data());
        if let Err(e) = written {
            // The tail is now unknown. Try to cut it back; either way refuse further appends.
            self.failed = true;
            let _ = file.set_len(segment.bytes).and_then(|()| file.sync_all());
            return Err(io_error(&segment.path)(e));
        }
        segment.bytes += record.len() as u64;
        segment.last_height = block.height;
        self.last_height = Some(block.height);
        Ok(())
    }

    fn read_after(&mut self, after: Height) -> Result<Vec<Block>, StorageError> {
        let mut blocks = Vec::new();
        let Some(first) = self.segments.first() else {
            return Ok(blocks);
        };
        if first.first_height > after.increment() {
            return Err(corrupt(
                &first.path,
                format!(
                    "blocks after height {after} were requested but the log starts at height {}; \
                     blocks {}..={} are missing (the log was truncated beyond the checkpoint \
                     being restored)",
                    first.first_height,
                    after.increment(),
                    Height(first.first_height.0 - 1)
                ),
            ));
        }
        let count = self.segments.len();
        for index in 0..count {
            let segment = self.segments[index].clone();
            if segment.last_height <= after {
                continue;
            }
            let is_last = index + 1 == count;
            let scan =
                self.scan_segment(&segment.path, segment.first_height, is_last, |block| {
                    if block.height > after {
                        blocks.push(block)
                    }
                })?;
            if scan.torn_reason.is_some() || scan.last_height != Some(segment.last_height) {
                // Appends and the repair at open leave no torn tail, so the file changed under us.
                return Err(corrupt(
                    &segment.path,
                    format!(
                        "segment changed on disk: expected blocks {}..={} in {} bytes, found {} \
                         valid bytes of {}",
                        segment.first_height,
                        segment.last_height,
                        segment.bytes,
                        scan.valid_bytes,
                        scan.file_bytes
                    ),
                ));
            }
        }
        Ok(blocks)
    }

    fn truncate_through(&mut self, height: Height) -> Result<(), StorageError> {
        let keep_from = self
            .segments
            .iter()
            .position(|s| s.last_height > height)
            .unwrap_or(self.segments.len());
        for segment in self.segments.drain(..keep_from) {
            std::fs::remove_file(&segment.path).map_err(io_error(&segment.path))?;
        }
        if keep_from > 0 {
            sync_dir(&self.dir)?;
        }
        // Roll: blocks after the checkpoint go to a fresh segment that can later be deleted whole.
        self.active = None;
        Ok(())
    }
}

/// The file name of the segment starting at `height`.
fn segment_name(height: Height) -> String {
    format!("{:020}.{SEGMENT_EXTENSION}", height.0)
}

/// The first height encoded in a segment file name, or `None` if `name` is not a segment.
fn parse_segment_name(name: &str) -> Option<Height> {
    let digits = name.strip_suffix(&format!(".{SEGMENT_EXTENSION}"))?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Height)
}

/// Whether every byte left in `reader` is zero (a region the filesystem extended but that was
/// never written).
fn rest_is_zero(reader: &mut impl Read) -> std::io::Result<bool> {
    let mut buffer = [0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            return Ok(true);
        }
        if buffer[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openic_types::{CanisterId, RequestId, SignedIngress, Time};

    fn block(height: u64, ingress: usize) -> Block {
        Block {
            height: Height(height),
            time: Time(1_000 + height),
            ingress: (0..ingress)
                .map(|i| SignedIngress {
                    request_id: RequestId([i as u8; 32]),
                    sender: openic_types::Principal::anonymous(),
                    canister_id: CanisterId::from_u64(7),
                    effective_canister_id: CanisterId::from_u64(7),
                    method_name: "go".to_string(),
                    arg: vec![height as u8; 100],
                    ingress_expiry: Time(5_000),
                    size_bytes: 200,
                })
                .collect(),
            randomness: [height as u8; 32],
        }
    }

    fn segment_paths(dir: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.join("blocks"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        paths
    }

    fn heights(blocks: &[Block]) -> Vec<u64> {
        blocks.iter().map(|b| b.height.0).collect()
    }

    #[test]
    fn append_read_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        assert!(log.read_after(Height(0)).unwrap().is_empty());
        for h in 1..=5 {
            log.append(&block(h, h as usize)).unwrap();
        }
        assert_eq!(heights(&log.read_after(Height(2)).unwrap()), vec![3, 4, 5]);
        drop(log);

        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        assert_eq!(log.last_height(), Some(Height(5)));
        let blocks = log.read_after(Height(0)).unwrap();
        assert_eq!(
            blocks,
            (1..=5).map(|h| block(h, h as usize)).collect::<Vec<_>>()
        );
        log.append(&block(6, 0)).unwrap();
        assert_eq!(heights(&log.read_after(Height(4)).unwrap()), vec![5, 6]);
    }

    #[test]
    fn refuses_height_gaps_and_oversized_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let config = BlockLogConfig {
            record_max_bytes: 1_000,
            ..BlockLogConfig::default()
        };
        let mut log = FileBlockLog::open(dir.path(), config).unwrap();
        log.append(&block(10, 0)).unwrap();
        let gap = log.append(&block(12, 0)).unwrap_err();
        assert!(gap.to_string().contains("does not follow"), "{gap}");
        let big = log.append(&block(11, 20)).unwrap_err();
        assert!(big.to_string().contains("record limit"), "{big}");
        log.append(&block(11, 1)).unwrap();
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        for h in 1..=3 {
            log.append(&block(h, 2)).unwrap();
        }
        drop(log);
        let path = segment_paths(dir.path()).pop().unwrap();
        let good_len = std::fs::metadata(&path).unwrap().len();

        // A crash in the middle of writing block 4: only part of its record reached the disk.
        let mut tail = Vec::new();
        let payload = serde_cbor::to_vec(&block(4, 2)).unwrap();
        tail.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        tail.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        tail.extend_from_slice(&crc32fast::hash(&tail[0..8]).to_le_bytes());
        tail.extend_from_slice(&payload[..payload.len() / 2]);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&tail).unwrap();
        drop(file);

        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(heights(&log.read_after(Height(0)).unwrap()), vec![1, 2, 3]);
        log.append(&block(4, 1)).unwrap();
        drop(log);

        // A zero-filled tail (the filesystem extended the file but the data never arrived).
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0u8; 5000]).unwrap();
        drop(file);
        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        assert_eq!(
            heights(&log.read_after(Height(0)).unwrap()),
            vec![1, 2, 3, 4]
        );

        // Only a few header bytes of the next record.
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[1, 2, 3]).unwrap();
        drop(file);
        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        assert_eq!(log.last_height(), Some(Height(4)));
        log.append(&block(5, 0)).unwrap();
        assert_eq!(log.read_after(Height(4)).unwrap(), vec![block(5, 0)]);
    }

    #[test]
    fn damage_followed_by_data_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        for h in 1..=3 {
            log.append(&block(h, 2)).unwrap();
        }
        drop(log);
        let path = segment_paths(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip a byte inside the first record's payload.
        let position = SEGMENT_HEADER_BYTES as usize + RECORD_HEADER_BYTES as usize + 10;
        bytes[position] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let error = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap_err();
        assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("checksum"), "{error}");

        // A damaged length field is caught by the header checksum, not trusted.
        bytes[position] ^= 0x40;
        bytes[SEGMENT_HEADER_BYTES as usize] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let error = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap_err();
        assert!(error.to_string().contains("header checksum"), "{error}");
    }

    #[test]
    fn damage_in_an_earlier_segment_is_corrupt_even_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        log.append(&block(1, 1)).unwrap();
        log.truncate_through(Height(0)).unwrap(); // rolls to a new segment
        log.append(&block(2, 1)).unwrap();
        drop(log);
        let first = segment_paths(dir.path()).remove(0);
        let len = std::fs::metadata(&first).unwrap().len();
        let file = OpenOptions::new().write(true).open(&first).unwrap();
        file.set_len(len - 3).unwrap();
        drop(file);
        let error = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap_err();
        assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
    }

    #[test]
    fn segments_roll_and_truncate_whole() {
        let dir = tempfile::tempdir().unwrap();
        let config = BlockLogConfig {
            segment_max_bytes: 2_000,
            ..BlockLogConfig::default()
        };
        let mut log = FileBlockLog::open(dir.path(), config.clone()).unwrap();
        for h in 1..=20 {
            log.append(&block(h, 2)).unwrap();
        }
        let before = segment_paths(dir.path()).len();
        assert!(before > 3, "expected several segments, got {before}");
        log.truncate_through(Height(10)).unwrap();
        let blocks = log.read_after(Height(10)).unwrap();
        assert_eq!(heights(&blocks), (11..=20).collect::<Vec<_>>());
        assert!(segment_paths(dir.path()).len() < before);
        let first = log.first_height().unwrap();
        assert!(
            first <= Height(11),
            "blocks after the checkpoint were deleted"
        );
        // Blocks the caller no longer needs may still be there (whole segments only), but asking
        // for blocks before the first kept segment is an error, not silence.
        if first > Height(1) {
            let error = log.read_after(Height(0)).unwrap_err();
            assert!(error.to_string().contains("missing"), "{error}");
        }

        log.truncate_through(Height(20)).unwrap();
        assert!(segment_paths(dir.path()).is_empty());
        log.append(&block(21, 0)).unwrap();
        drop(log);
        let mut log = FileBlockLog::open(dir.path(), config).unwrap();
        assert_eq!(heights(&log.read_after(Height(20)).unwrap()), vec![21]);
    }

    #[test]
    fn empty_last_segment_from_a_crash_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        log.append(&block(1, 0)).unwrap();
        drop(log);
        std::fs::write(
            dir.path().join("blocks").join(segment_name(Height(2))),
            b"OIC",
        )
        .unwrap();
        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        assert_eq!(segment_paths(dir.path()).len(), 1);
        log.append(&block(2, 0)).unwrap();
        assert_eq!(heights(&log.read_after(Height(0)).unwrap()), vec![1, 2]);
    }
}
