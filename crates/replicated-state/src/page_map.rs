//! [`PageMap`]: a sparse, copy-on-write array of 4 KiB pages. Wasm heap and stable memory are both
//! page maps. Pages that were never written are absent and read as zeros; a clone shares every page
//! until one side writes it.
//!
//! The index is a persistent B-tree (`imbl::OrdMap`): cloning a page map is O(1) whatever its size
//! (the state is cloned for every height's query snapshot, and a canister with gigabytes of memory
//! must not make that cost anything), a write copies only the path to its page, and
//! [`PageMap::changes_since`] visits only the subtrees two versions do not share, so an executor can
//! find what changed between two versions at the cost of the change.

use imbl::ordmap::DiffItem;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::sync::Arc;

/// Size of one page of a [`PageMap`] in bytes (the OS page size, not the 64 KiB wasm page).
pub const PAGE_SIZE: usize = 4096;

/// One page of memory.
pub type Page = [u8; PAGE_SIZE];

/// A page of zeros to compare against: slice equality compiles to `memcmp`, which is several
/// times faster than testing byte by byte, and heaps are mostly zeros.
static ZERO_PAGE: Page = [0u8; PAGE_SIZE];

fn is_zero(bytes: &[u8]) -> bool {
    bytes == &ZERO_PAGE[..bytes.len()]
}

/// Index of a page in a [`PageMap`].
pub type PageIndex = u64;

/// A sparse, copy-on-write memory image. Invariant: every stored page is exactly [`PAGE_SIZE`]
/// bytes; an all-zero page may or may not be stored (readers cannot tell the difference).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PageMap {
    pages: imbl::OrdMap<PageIndex, Arc<Page>>,
}

impl std::fmt::Debug for PageMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageMap({} pages)", self.pages.len())
    }
}

impl PageMap {
    /// An empty (all-zero) page map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The page at `index`, or `None` if it was never written (it reads as zeros).
    pub fn page(&self, index: PageIndex) -> Option<&Page> {
        self.pages.get(&index).map(|p| &**p)
    }

    /// Stored pages in index order.
    pub fn pages(&self) -> impl Iterator<Item = (PageIndex, &Page)> {
        self.pages.iter().map(|(i, p)| (*i, &**p))
    }

    /// Number of stored pages.
    pub fn num_stored_pages(&self) -> usize {
        self.pages.len()
    }

    /// Replaces the page at `index`. An all-zero page is dropped instead of stored.
    pub fn set_page(&mut self, index: PageIndex, page: &Page) {
        if is_zero(page) {
            self.pages.remove(&index);
        } else {
            self.pages.insert(index, Arc::new(*page));
        }
    }

    /// Removes every page at or beyond `first_index` (used when memory shrinks on reinstall).
    pub fn truncate(&mut self, first_index: PageIndex) {
        // Key by key: keeps the rest shared with other versions (imbl's `split` rebuilds it).
        let beyond: Vec<PageIndex> = self.pages.range(first_index..).map(|(i, _)| *i).collect();
        for index in beyond {
            self.pages.remove(&index);
        }
    }

    /// The pages whose contents differ between `older` and `self`, in index order, with their
    /// contents in `self` (`None`: the page reads as zeros now). Costs what changed, not the size
    /// of the maps, when `self` was derived from `older` (their unchanged parts are shared).
    pub fn changes_since<'a>(
        &'a self,
        older: &'a PageMap,
    ) -> impl Iterator<Item = (PageIndex, Option<&'a Page>)> + 'a {
        older.pages.diff(&self.pages).map(|item| match item {
            DiffItem::Add(index, page) => (*index, Some(&**page)),
            DiffItem::Update {
                new: (index, page), ..
            } => (*index, Some(&**page)),
            DiffItem::Remove(index, _) => (*index, None),
        })
    }

    /// Whether `self` and `other` are the same version (one is an unmodified clone of the other).
    /// `false` does not imply the contents differ.
    pub fn is_same_version(&self, other: &PageMap) -> bool {
        self.pages.ptr_eq(&other.pages)
    }

    /// Copies `dst.len()` bytes starting at byte `offset` into `dst`; unwritten bytes read as zero.
    pub fn read(&self, offset: u64, dst: &mut [u8]) {
        dst.fill(0);
        if dst.is_empty() {
            return;
        }
        let first = offset / PAGE_SIZE as u64;
        let last = (offset + dst.len() as u64 - 1) / PAGE_SIZE as u64;
        for (index, page) in self.pages.range(first..=last) {
            let page_start = index * PAGE_SIZE as u64;
            let copy_start = offset.max(page_start);
            let copy_end = (offset + dst.len() as u64).min(page_start + PAGE_SIZE as u64);
            let src = &page[(copy_start - page_start) as usize..(copy_end - page_start) as usize];
            dst[(copy_start - offset) as usize..(copy_end - offset) as usize].copy_from_slice(src);
        }
    }

    /// Writes `src` at byte `offset`, creating pages as needed.
    pub fn write(&mut self, offset: u64, src: &[u8]) {
        let mut done = 0usize;
        while done < src.len() {
            let at = offset + done as u64;
            let index = at / PAGE_SIZE as u64;
            let within = (at % PAGE_SIZE as u64) as usize;
            let n = (PAGE_SIZE - within).min(src.len() - done);
            let mut page = self.page(index).copied().unwrap_or([0u8; PAGE_SIZE]);
            page[within..within + n].copy_from_slice(&src[done..done + n]);
            self.set_page(index, &page);
            done += n;
        }
    }

    /// Copies a whole contiguous memory image into `dst` (which must be zeroed or will be zeroed
    /// where no page is stored). `dst.len()` need not be a multiple of [`PAGE_SIZE`].
    pub fn copy_to_slice(&self, dst: &mut [u8]) {
        self.read(0, dst)
    }

    /// Builds a page map from a contiguous memory image, and returns it. Zero pages are not stored.
    pub fn from_slice(src: &[u8]) -> PageMap {
        let mut map = PageMap::new();
        map.update_from_slice(src);
        map
    }

    /// Makes this page map equal to the memory image `src`, touching only pages whose contents
    /// differ, and returns the indexes of the pages that changed. Pages beyond `src` are removed.
    pub fn update_from_slice(&mut self, src: &[u8]) -> Vec<PageIndex> {
        let mut changed = Vec::new();
        let num_pages = src.len().div_ceil(PAGE_SIZE) as u64;
        for index in 0..num_pages {
            let start = index as usize * PAGE_SIZE;
            let end = (start + PAGE_SIZE).min(src.len());
            let chunk = &src[start..end];
            let same = match self.pages.get(&index) {
                Some(page) => page[..chunk.len()] == *chunk && is_zero(&page[chunk.len()..]),
                None => is_zero(chunk),
            };
            if !same {
                let mut page = [0u8; PAGE_SIZE];
                page[..chunk.len()].copy_from_slice(chunk);
                self.set_page(index, &page);
                changed.push(index);
            }
        }
        changed.extend(self.pages.range(num_pages..).map(|(i, _)| *i));
        self.truncate(num_pages);
        changed
    }

    /// Whether two page maps share the same `Arc` for page `index` (a cheap "unchanged" test used by
    /// incremental checkpoints). `false` does not imply the contents differ.
    pub fn shares_page_with(&self, other: &PageMap, index: PageIndex) -> bool {
        match (self.pages.get(&index), other.pages.get(&index)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

/// Page maps serialise as a list of `(index, bytes)` pairs. The state manager does not use this for
/// checkpoints (it writes pages incrementally); it exists so whole states can be compared in tests.
impl Serialize for PageMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let pages: Vec<(PageIndex, &serde_bytes::Bytes)> = self
            .pages
            .iter()
            .map(|(i, p)| (*i, serde_bytes::Bytes::new(&p[..])))
            .collect();
        pages.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for PageMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let pages: Vec<(PageIndex, serde_bytes::ByteBuf)> = Vec::deserialize(deserializer)?;
        let mut map = PageMap::new();
        for (index, bytes) in pages {
            if bytes.len() != PAGE_SIZE {
                return Err(serde::de::Error::custom(format!(
                    "page {index} has {} bytes, expected {PAGE_SIZE}",
                    bytes.len()
                )));
            }
            let mut page = [0u8; PAGE_SIZE];
            page.copy_from_slice(&bytes);
            map.set_page(index, &page);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_across_page_boundaries() {
        let mut map = PageMap::new();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        map.write(4000, &data);
        let mut out = vec![0u8; 10_000];
        map.read(4000, &mut out);
        assert_eq!(out, data);
        let mut zeros = vec![1u8; 100];
        map.read(100_000, &mut zeros);
        assert!(zeros.iter().all(|b| *b == 0));
    }

    #[test]
    fn update_from_slice_reports_only_changed_pages() {
        let mut image = vec![0u8; PAGE_SIZE * 4];
        image[5] = 1;
        image[PAGE_SIZE * 3 + 7] = 2;
        let mut map = PageMap::from_slice(&image);
        assert_eq!(map.num_stored_pages(), 2);
        image[PAGE_SIZE * 2] = 9;
        assert_eq!(map.update_from_slice(&image), vec![2]);
        assert_eq!(map.update_from_slice(&image[..PAGE_SIZE]), vec![2, 3]);
    }

    #[test]
    fn changes_since_names_exactly_the_changed_pages() {
        let mut old = PageMap::new();
        for index in 0..10_000u64 {
            old.set_page(index, &[index as u8 | 1; PAGE_SIZE]);
        }
        let mut new = old.clone();
        assert!(new.is_same_version(&old));
        assert_eq!(new.changes_since(&old).count(), 0);
        new.set_page(17, &[9; PAGE_SIZE]);
        new.set_page(17, &[9; PAGE_SIZE]);
        new.set_page(4_000, &[0; PAGE_SIZE]);
        new.set_page(20_000, &[3; PAGE_SIZE]);
        new.set_page(5, &[5 | 1; PAGE_SIZE]); // same contents as before
        assert!(!new.is_same_version(&old));
        let changes: Vec<(PageIndex, Option<u8>)> = new
            .changes_since(&old)
            .map(|(index, page)| (index, page.map(|p| p[0])))
            .collect();
        assert_eq!(
            changes,
            vec![(17, Some(9)), (4_000, None), (20_000, Some(3))]
        );
        new.truncate(9_000);
        assert_eq!(new.num_stored_pages(), 8_999);
        assert!(new.page(9_000).is_none() && new.page(8_999).is_some());
    }
}
