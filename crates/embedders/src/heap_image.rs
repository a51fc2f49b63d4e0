//! Heap images: large canister heaps kept as files in memory, mapped copy-on-write into each
//! execution, so running a message on a heap of gigabytes costs the pages it touches rather than
//! the size of the heap.
//!
//! Note [tracked heaps]: a heap of at least [`TRACKED_HEAP_MIN_BYTES`] is not copied into the
//! fresh instance and compared back page by page. Instead:
//! - the canister's heap, as of some version `base` of its page map, lives in a `memfd`
//!   ([`HeapImage`]), kept per canister in [`HeapImages`] (bounded in bytes, least recently used
//!   evicted);
//! - an execution maps that file `MAP_PRIVATE` over its linear memory (one `mmap`; pages fault in
//!   from the shared page cache when touched), then writes the pages in which the current version
//!   differs from `base` ([`PageMap::changes_since`], which costs the difference, not the heap);
//! - afterwards, the pages the execution may have written are exactly those that are no longer the
//!   file's: private (anonymous) pages, present or swapped out. The kernel lists them
//!   (`PAGEMAP_SCAN`, `memory_pool::touched_pages`), and only they are compared with the page
//!   map. A heap too small to be worth a file starts from zero-filled memory with its stored
//!   pages copied in, and is scanned the same way.
//!
//! The result is the same page map the full comparison gives (the scan may name extra pages, for
//! example ones only read in memory grown during the execution; comparing them finds nothing), so
//! replicated results do not depend on which path ran, on the cache, or on the kernel: where the
//! scan is unavailable the whole heap is compared. What a message is charged depends only on the
//! pages whose contents changed ([`crate::HEAP_PAGE_WRITE_INSTRUCTIONS`]).
//!
//! When the difference from `base` grows past [`REBASE_PAGES`], the file is brought up to date in
//! place if no execution has it mapped (a mapped file must not change under a `MAP_PRIVATE`
//! mapping: pages not yet copied would show the new bytes), else it is used as it is while the
//! difference stays below [`MAX_COPY_PAGES`], and rebuilt beyond that.

use openic_replicated_state::{PAGE_SIZE, PageMap};
use openic_types::CanisterId;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::MemfdFlags;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Heaps at least this large run as tracked heaps (Note [tracked heaps]); smaller ones are copied
/// in and compared back whole, which is cheaper at that size.
pub const TRACKED_HEAP_MIN_BYTES: u64 = 16 * 1024 * 1024;

/// Heaps with at least this many stored pages get a file image; with fewer, copying the stored
/// pages into zeroed memory is as cheap as mapping.
pub const IMAGE_MIN_STORED_PAGES: usize = 2048;

/// Pages an image may lag behind the version it serves before it is brought up to date. Every
/// execution writes the pages it lags by into fresh memory (and compares them back), which costs
/// about as much as writing them to the image once: bringing the image up to date early is
/// cheapest. (At 1,024, a canister with a 1 GiB heap paid ~3 ms per update for the lag.)
pub const REBASE_PAGES: usize = 32;

/// Pages an image in use may lag behind before a new one is built instead of copying them all.
pub const MAX_COPY_PAGES: usize = 65_536;

/// Bytes written to an image per system call while building or updating it.
const WRITE_BATCH_BYTES: usize = 1 << 20;

/// One canister heap, as of the page map `base`, in a memory file of `len` bytes.
#[derive(Debug)]
pub(crate) struct HeapImage {
    file: OwnedFd,
    len: usize,
    base: PageMap,
}

impl HeapImage {
    /// The memory file.
    pub(crate) fn file(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Bytes in the file (a multiple of the OS page size); everything past it is zero.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The version of the heap the file holds.
    pub(crate) fn base(&self) -> &PageMap {
        &self.base
    }

    /// A new file holding `map`, `len` bytes long.
    pub(crate) fn build(map: &PageMap, len: usize) -> std::io::Result<HeapImage> {
        let file = rustix::fs::memfd_create("openic-heap", MemfdFlags::CLOEXEC)?;
        let mut image = HeapImage {
            file,
            len: 0,
            base: PageMap::new(),
        };
        image.resize(len)?;
        image.write_pages(map.pages().map(|(index, page)| (index, Some(page))))?;
        image.base = map.clone();
        Ok(image)
    }

    /// Brings the file up to `map` (writing only what differs from `base`) and `len` bytes.
    fn update(&mut self, map: &PageMap, len: usize) -> std::io::Result<()> {
        if len > self.len {
            self.resize(len)?;
        }
        let changes: Vec<_> = map.changes_since(&self.base).collect();
        self.write_pages(changes.into_iter())?;
        self.base = map.clone();
        Ok(())
    }

    fn resize(&mut self, len: usize) -> std::io::Result<()> {
        rustix::fs::ftruncate(&self.file, len as u64)?;
        self.len = len;
        Ok(())
    }

    /// Writes pages (`None`: zeros) in index order, batching runs of consecutive pages.
    fn write_pages<'a>(
        &self,
        pages: impl Iterator<Item = (u64, Option<&'a [u8; PAGE_SIZE]>)>,
    ) -> std::io::Result<()> {
        static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES);
        let mut batch_start = 0u64;
        let flush = |batch: &mut Vec<u8>, start: u64| -> std::io::Result<()> {
            let mut done = 0;
            while done < batch.len() {
                let offset = start * PAGE_SIZE as u64 + done as u64;
                done += rustix::io::pwrite(&self.file, &batch[done..], offset)?;
            }
            batch.clear();
            Ok(())
        };
        for (index, page) in pages {
            let byte = (index as usize).saturating_mul(PAGE_SIZE);
            if byte >= self.len {
                continue;
            }
            let next = batch_start + (batch.len() / PAGE_SIZE) as u64;
            if !batch.is_empty() && (index != next || batch.len() >= WRITE_BATCH_BYTES) {
                flush(&mut batch, batch_start)?;
            }
            if batch.is_empty() {
                batch_start = index;
            }
            batch.extend_from_slice(page.unwrap_or(&ZEROS));
        }
        if !batch.is_empty() {
            flush(&mut batch, batch_start)?;
        }
        Ok(())
    }
}

struct Entry {
    image: Arc<HeapImage>,
    last_used: u64,
}

/// The heap images of the canisters with the largest heaps, bounded in bytes. See Note [tracked
/// heaps].
pub(crate) struct HeapImages {
    entries: Mutex<Images>,
    max_bytes: usize,
}

struct Images {
    by_canister: BTreeMap<CanisterId, Entry>,
    clock: u64,
    bytes: usize,
}

impl HeapImages {
    pub(crate) fn new(max_bytes: usize) -> Self {
        HeapImages {
            entries: Mutex::new(Images {
                by_canister: BTreeMap::new(),
                clock: 0,
                bytes: 0,
            }),
            max_bytes,
        }
    }

    /// An image of `canister`'s heap from which `map` (of `heap_bytes` bytes) differs in few
    /// pages, building or updating one as needed; `None` if the heap is not worth one, does not
    /// fit the cache, or the kernel refused (the caller then copies every stored page).
    pub(crate) fn image_for(
        &self,
        canister: CanisterId,
        map: &PageMap,
        heap_bytes: usize,
    ) -> Option<Arc<HeapImage>> {
        if map.num_stored_pages() < IMAGE_MIN_STORED_PAGES || heap_bytes > self.max_bytes {
            return None;
        }
        let len = heap_bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut images = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        images.clock += 1;
        let now = images.clock;
        if let Some(entry) = images.by_canister.get_mut(&canister) {
            entry.last_used = now;
            let behind = map
                .changes_since(entry.image.base())
                .take(MAX_COPY_PAGES + 1)
                .count();
            if behind <= REBASE_PAGES {
                return Some(entry.image.clone());
            }
            let old_len = entry.image.len();
            if let Some(image) = Arc::get_mut(&mut entry.image) {
                // No execution maps it: bring it up to date in place.
                let updated = image.update(map, len.max(old_len));
                let new_len = image.len();
                match updated {
                    Ok(()) => {
                        images.bytes = images.bytes - old_len + new_len;
                        let entry = images.by_canister.get(&canister)?;
                        return Some(entry.image.clone());
                    }
                    Err(error) => {
                        tracing::warn!(%canister, %error, "could not update a heap image");
                        images.bytes -= old_len;
                        images.by_canister.remove(&canister);
                        return None;
                    }
                }
            }
            if behind <= MAX_COPY_PAGES {
                return Some(entry.image.clone());
            }
            images.bytes -= old_len;
            images.by_canister.remove(&canister);
        }
        let image = match HeapImage::build(map, len) {
            Ok(image) => Arc::new(image),
            Err(error) => {
                tracing::warn!(%canister, %error, "could not build a heap image");
                return None;
            }
        };
        images.bytes += len;
        images.by_canister.insert(
            canister,
            Entry {
                image: image.clone(),
                last_used: now,
            },
        );
        while images.bytes > self.max_bytes {
            let oldest = images
                .by_canister
                .iter()
                .filter(|(id, _)| **id != canister)
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(id, _)| *id);
            let Some(oldest) = oldest else { break };
            if let Some(evicted) = images.by_canister.remove(&oldest) {
                images.bytes -= evicted.image.len();
            }
        }
        Some(image)
    }

    /// Bytes held by images (for tests and metrics).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.entries.lock().unwrap().bytes
    }

    /// How many holders `canister`'s image has besides the cache (for tests).
    #[cfg(test)]
    pub(crate) fn users(&self, canister: CanisterId) -> Option<usize> {
        let images = self.entries.lock().unwrap();
        let entry = images.by_canister.get(&canister)?;
        Some(Arc::strong_count(&entry.image) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(image: &HeapImage, index: u64) -> [u8; PAGE_SIZE] {
        let mut page = [0u8; PAGE_SIZE];
        let n = rustix::io::pread(image.file(), &mut page, index * PAGE_SIZE as u64).unwrap();
        assert_eq!(n, PAGE_SIZE);
        page
    }

    fn map_with(pages: u64) -> PageMap {
        let mut map = PageMap::new();
        for index in 0..pages {
            map.set_page(index, &[(index % 251) as u8 + 1; PAGE_SIZE]);
        }
        map
    }

    #[test]
    fn an_image_holds_the_map_and_is_updated_in_place_when_unused() {
        let images = HeapImages::new(1 << 30);
        let canister = CanisterId::from_u64(1);
        let map = map_with(IMAGE_MIN_STORED_PAGES as u64 + 10);
        let heap = (IMAGE_MIN_STORED_PAGES + 100) * PAGE_SIZE;
        let image = images.image_for(canister, &map, heap).expect("image");
        assert_eq!(image.len(), heap);
        assert_eq!(read(&image, 7), [8; PAGE_SIZE]);
        assert_eq!(
            read(&image, IMAGE_MIN_STORED_PAGES as u64 + 50),
            [0; PAGE_SIZE]
        );

        // A few changes: the same image serves, the caller copies them.
        let mut changed = map.clone();
        changed.set_page(3, &[0xAA; PAGE_SIZE]);
        let again = images.image_for(canister, &changed, heap).unwrap();
        assert!(Arc::ptr_eq(&image, &again));
        drop((image, again));

        // Many changes while nobody maps it: updated in place.
        for index in 0..(REBASE_PAGES as u64 + 10) {
            changed.set_page(index, &[0xBB; PAGE_SIZE]);
        }
        changed.set_page(100, &[0; PAGE_SIZE]);
        let updated = images.image_for(canister, &changed, heap).unwrap();
        assert_eq!(read(&updated, 5), [0xBB; PAGE_SIZE]);
        assert_eq!(read(&updated, 100), [0; PAGE_SIZE]);
        assert_eq!(read(&updated, 2000), [(2000 % 251) as u8 + 1; PAGE_SIZE]);
        assert_eq!(updated.base().changes_since(&changed).count(), 0);
        assert_eq!(images.bytes(), heap);
    }

    #[test]
    fn an_image_in_use_is_not_changed_under_its_mapping() {
        let images = HeapImages::new(1 << 30);
        let canister = CanisterId::from_u64(1);
        let map = map_with(IMAGE_MIN_STORED_PAGES as u64);
        let heap = IMAGE_MIN_STORED_PAGES * PAGE_SIZE;
        let in_use = images.image_for(canister, &map, heap).unwrap();
        let mut changed = map.clone();
        for index in 0..(REBASE_PAGES as u64 + 10) {
            changed.set_page(index, &[0xCC; PAGE_SIZE]);
        }
        let served = images.image_for(canister, &changed, heap).unwrap();
        assert!(Arc::ptr_eq(&in_use, &served), "served as it is");
        assert_eq!(read(&in_use, 0), [1; PAGE_SIZE], "its bytes did not change");
    }

    #[test]
    fn small_heaps_get_no_image_and_the_cache_is_bounded() {
        let canister = CanisterId::from_u64(1);
        let small = map_with(10);
        assert!(
            HeapImages::new(1 << 30)
                .image_for(canister, &small, 1 << 20)
                .is_none()
        );
        let map = map_with(IMAGE_MIN_STORED_PAGES as u64);
        let heap = IMAGE_MIN_STORED_PAGES * PAGE_SIZE;
        let images = HeapImages::new(heap * 2);
        for id in 1..=3 {
            images
                .image_for(CanisterId::from_u64(id), &map, heap)
                .unwrap();
        }
        assert_eq!(images.bytes(), heap * 2, "the least recently used went");
        assert!(images.image_for(canister, &map, heap * 3).is_none());
    }
}
