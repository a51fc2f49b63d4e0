//! Recycled linear memories: the wasmtime [`MemoryCreator`] of the embedder.
//!
//! Note [recycled linear memories]: every execution instantiates afresh (Note [instance-free
//! state] in `instrumentation`), so with wasmtime's default allocator each execution mapped a
//! 4 GiB reservation, faulted in every heap page it copied in (the kernel zeroing each one), and
//! unmapped it all afterwards (a TLB shootdown across cores). Profiles of the replica benchmark
//! showed that as about half of the node's CPU. This creator keeps released reservations in a
//! small pool instead:
//! - a region remembers how long a prefix of it may hold non-zero bytes (`dirty`); everything past
//!   it is zero. A released memory keeps at most [`KEEP_RESIDENT_BYTES`] of dirty, resident
//!   pages; the rest goes back to the kernel with `madvise(MADV_DONTNEED)` (it reads as zeros);
//! - zeroing is lazy: a new memory zeroes only its accessible part of the dirty prefix, and growth
//!   zeroes only the dirty part it exposes. An execution that restores a heap image asks for an
//!   *unzeroed* memory of the image's size instead ([`create_unzeroed`]) and then writes every
//!   byte of the dirty prefix itself (stored pages copied, the others zeroed), so the same bytes
//!   are not written twice;
//! - a reused reservation is made accessible (`mprotect`) up to exactly the new memory's size, so
//!   everything past the size still faults and wasmtime's elided bounds checks stay sound. A
//!   region reused for a memory of the size it had before needs no system call at all;
//! - reservations and guards are as wasmtime asks (`reserved_size_in_bytes` + guard, never less);
//!   a memory that must grow past its reservation (only possible for memory64) moves to a new,
//!   larger mapping, which is unmapped, not pooled, when released.
//!
//! Invariant: every byte of a region at or past `dirty` is zero, and exactly its first
//! `accessible` bytes are readable and writable. A memory handed to wasmtime reads as zeros (the
//! `MemoryCreator` contract) except through [`create_unzeroed`], whose caller overwrites it before
//! any wasm runs.

// The one place in openic that manages memory mappings by hand; every `unsafe` states why it is
// sound.
#![allow(unsafe_code)]

use crate::heap_image::HeapImage;
use rustix::mm::{Advice, MapFlags, MprotectFlags, ProtFlags};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// Most bytes of a released memory kept resident (to be overwritten or zeroed by the next user);
/// dirty pages past this are returned to the kernel.
pub const KEEP_RESIDENT_BYTES: usize = 4 * 1024 * 1024;

/// Most idle reservations kept; more are unmapped when released.
pub const MAX_IDLE_REGIONS: usize = 16;

const OS_PAGE_BYTES: usize = 4096;

fn round_up_to_os_page(n: usize) -> Option<usize> {
    n.checked_add(OS_PAGE_BYTES - 1)
        .map(|n| n & !(OS_PAGE_BYTES - 1))
}

/// Why a heap image could not be mapped.
#[derive(Debug)]
enum MapError {
    /// The region is as before (anonymous zeros): copy the heap in instead.
    NotMapped(String),
    /// The region may have a hole and must not be used.
    Broken(String),
}

/// One anonymous mapping: `capacity` bytes of (partly accessible) memory followed by `guard`
/// inaccessible bytes.
#[derive(Debug)]
struct Region {
    base: *mut u8,
    capacity: usize,
    guard: usize,
    accessible: usize,
    /// Bytes at or past this offset are zero.
    dirty: usize,
    /// The pool's generation when the region was last given back (see [`RecyclingMemoryCreator::release_idle`]).
    released_in: u64,
    /// Bytes at the start mapped from a heap image's file rather than anonymous memory.
    file_mapped: usize,
}

// SAFETY: a region is a private anonymous mapping owned by exactly one `Region` value; moving
// that ownership between threads is sound. Access to its bytes is governed by wasmtime, which
// owns the memory while an instance uses it.
unsafe impl Send for Region {}
// SAFETY: `Region` has no interior mutability; shared references only read its fields.
unsafe impl Sync for Region {}

impl Region {
    /// Reserves `capacity + guard` bytes, all inaccessible and zero.
    fn reserve(capacity: usize, guard: usize) -> Result<Region, String> {
        let len = capacity
            .checked_add(guard)
            .ok_or_else(|| "memory reservation size overflows".to_string())?;
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses aliases nothing.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| {
            format!("cannot reserve {len} bytes of address space for a wasm memory: {e}")
        })?;
        Ok(Region {
            base: base.cast(),
            capacity,
            guard,
            accessible: 0,
            dirty: 0,
            released_in: 0,
            file_mapped: 0,
        })
    }

    /// Maps the first `len` bytes of `image`'s file copy-on-write over the region's start
    /// (`len <= accessible`, within the file, a multiple of the OS page size).
    fn map_file(&mut self, image: &HeapImage, len: usize) -> Result<(), MapError> {
        debug_assert!(len <= self.accessible && len <= image.len());
        // SAFETY: `0..len` lies in the accessible part of this region's mapping, which only this
        // value owns and no instance runs on yet; MAP_FIXED replaces those pages with a private
        // copy-on-write view of the file, which is at least `len` bytes long (no SIGBUS), and the
        // file stays open (the memory holds the image) until `unmap_file` replaces the view.
        let mapped = unsafe {
            rustix::mm::mmap(
                self.base.cast(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::FIXED,
                image.file(),
                0,
            )
        };
        match mapped {
            Ok(_) => {
                self.file_mapped = len;
                self.dirty = self.dirty.max(len);
                Ok(())
            }
            Err(e) => {
                // A failed MAP_FIXED may have unmapped the range: make it anonymous again.
                self.file_mapped = len;
                if !self.unmap_file() {
                    return Err(MapError::Broken(format!(
                        "cannot map a heap image ({e}) and the memory could not be restored"
                    )));
                }
                Err(MapError::NotMapped(format!("cannot map a heap image: {e}")))
            }
        }
    }

    /// Replaces the mapped image (if any) with anonymous zeros, accessible as before. Returns
    /// `false` if the kernel refused (the region must then not be reused).
    fn unmap_file(&mut self) -> bool {
        if self.file_mapped == 0 {
            return true;
        }
        let len = self.file_mapped;
        // SAFETY: `0..len` lies inside this region's mapping and no instance uses it; a fresh
        // private anonymous mapping there reads as zeros and is accessible like the rest of the
        // accessible prefix (`len <= accessible`).
        let remapped = unsafe {
            rustix::mm::mmap_anonymous(
                self.base.cast(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            )
        };
        if remapped.is_err() {
            return false;
        }
        self.file_mapped = 0;
        true
    }

    /// Hands every dirty page of an idle region back to the kernel (they read as zeros after);
    /// returns the bytes discarded, or `None` if the kernel refused (the region must then not be
    /// reused).
    fn discard_dirty(&mut self) -> Option<usize> {
        let dirty = self.dirty;
        if dirty == 0 {
            return Some(0);
        }
        // SAFETY: `0..dirty` lies inside this region's mapping, and the region is idle (owned by
        // the pool, used by no instance); MADV_DONTNEED on a private anonymous mapping makes the
        // pages read as zeros, which keeps the invariant with `dirty = 0`.
        let discarded =
            unsafe { rustix::mm::madvise(self.base.cast(), dirty, Advice::LinuxDontNeed) };
        discarded.ok()?;
        self.dirty = 0;
        Some(dirty)
    }

    /// Makes exactly the first `len` bytes accessible (`len <= capacity`, a multiple of the OS
    /// page size).
    fn set_accessible(&mut self, len: usize) -> Result<(), String> {
        debug_assert!(len <= self.capacity && len.is_multiple_of(OS_PAGE_BYTES));
        if len > self.accessible {
            // SAFETY: the range lies inside this region's mapping, which only this value owns.
            unsafe {
                rustix::mm::mprotect(
                    self.base.add(self.accessible).cast(),
                    len - self.accessible,
                    MprotectFlags::READ | MprotectFlags::WRITE,
                )
            }
            .map_err(|e| format!("cannot make {len} bytes of a wasm memory accessible: {e}"))?;
        } else if len < self.accessible {
            // SAFETY: as above. Hidden bytes that may be non-zero stay covered by `dirty`, so they
            // are zeroed before growth exposes them again.
            unsafe {
                rustix::mm::mprotect(
                    self.base.add(len).cast(),
                    self.accessible - len,
                    MprotectFlags::empty(),
                )
            }
            .map_err(|e| format!("cannot shrink the accessible part of a wasm memory: {e}"))?;
        }
        self.accessible = len;
        Ok(())
    }

    /// Zeroes `start..end`, clipped to the dirty prefix (`end <= accessible`).
    fn zero(&mut self, start: usize, end: usize) {
        let end = end.min(self.dirty);
        if start < end {
            // SAFETY: `start..end` lies in the accessible, read-write part of this region, and the
            // memory using it is not running wasm while it is created or grown.
            unsafe { std::ptr::write_bytes(self.base.add(start), 0, end - start) };
        }
        if end == self.dirty && start < self.dirty {
            self.dirty = start;
        }
    }

    /// Called when the memory using the region is released: everything it could reach may be
    /// dirty; dirty pages past [`KEEP_RESIDENT_BYTES`] go back to the kernel. Returns `false` if
    /// the kernel refused, in which case the region must not be reused.
    fn release(&mut self) -> bool {
        self.dirty = self.dirty.max(self.accessible);
        if self.dirty > KEEP_RESIDENT_BYTES {
            // SAFETY: the range lies inside this region's mapping and no instance uses it any
            // more; MADV_DONTNEED on a private anonymous mapping makes the pages read as zeros.
            let dropped = unsafe {
                rustix::mm::madvise(
                    self.base.add(KEEP_RESIDENT_BYTES).cast(),
                    self.dirty - KEEP_RESIDENT_BYTES,
                    Advice::LinuxDontNeed,
                )
            };
            if dropped.is_err() {
                return false;
            }
            self.dirty = KEEP_RESIDENT_BYTES;
        }
        true
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `reserve` with exactly this length and nothing
        // refers to it any more.
        let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.capacity + self.guard) };
    }
}

/// Idle reservations, all of the standard shape (wasmtime's reservation and guard sizes).
#[derive(Debug)]
struct Pool {
    idle: Mutex<Vec<Region>>,
    /// Advanced by every [`RecyclingMemoryCreator::release_idle`].
    generation: AtomicU64,
}

impl Pool {
    fn take(&self, capacity: usize, guard: usize) -> Option<Region> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let position = idle
            .iter()
            .position(|r| r.capacity == capacity && r.guard == guard)?;
        Some(idle.swap_remove(position))
    }

    fn give_back(&self, mut region: Region) {
        if !region.release() {
            return;
        }
        region.released_in = self.generation.load(Ordering::Relaxed);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_REGIONS {
            idle.push(region);
        }
    }
}

/// The memory creator installed in the embedder's engine. See Note [recycled linear memories].
#[derive(Debug, Clone)]
pub struct RecyclingMemoryCreator {
    pool: Arc<Pool>,
}

impl RecyclingMemoryCreator {
    /// A creator with an empty pool.
    pub fn new() -> Self {
        RecyclingMemoryCreator {
            pool: Arc::new(Pool {
                idle: Mutex::new(Vec::new()),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// Returns to the kernel the pages kept resident by reservations that stayed idle since the
    /// previous call (up to [`KEEP_RESIDENT_BYTES`] each), so memory goes back once executions
    /// stop while a busy node keeps reusing warm regions. The node calls it periodically.
    /// Returns the bytes discarded.
    pub fn release_idle(&self) -> usize {
        let previous = self.pool.generation.fetch_add(1, Ordering::Relaxed);
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut discarded = 0;
        idle.retain_mut(|region| {
            if region.released_in >= previous {
                return true;
            }
            match region.discard_dirty() {
                Some(bytes) => {
                    discarded += bytes;
                    true
                }
                None => false,
            }
        });
        discarded
    }

    /// Number of idle reservations (for tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.pool.idle.lock().unwrap().len()
    }
}

impl Default for RecyclingMemoryCreator {
    fn default() -> Self {
        Self::new()
    }
}

/// Makes `bytes` read as zeros. `bytes` must lie in a linear memory made by
/// [`RecyclingMemoryCreator`] (a private anonymous mapping). Whole OS pages are handed back to the
/// kernel with `madvise(MADV_DONTNEED)` (no writes; a page touched later faults in as zeros),
/// which is much cheaper than writing a large range that was mostly zero and will mostly stay
/// untouched; the ragged ends, or everything if the kernel refuses, are written.
pub(crate) fn zero_heap_range(bytes: &mut [u8]) {
    let start = bytes.as_ptr() as usize;
    let first_page = round_up_to_os_page(start).unwrap_or(usize::MAX);
    let end = start + bytes.len();
    let last_page = end & !(OS_PAGE_BYTES - 1);
    if first_page < last_page {
        // SAFETY: `first_page..last_page` lies inside `bytes`, which the caller owns exclusively
        // (`&mut`) and which is part of a private anonymous mapping: after MADV_DONTNEED its pages
        // read as zeros, which is exactly the write this function promises.
        let discarded = unsafe {
            rustix::mm::madvise(
                first_page as *mut std::ffi::c_void,
                last_page - first_page,
                Advice::LinuxDontNeed,
            )
        };
        if discarded.is_ok() {
            bytes[..first_page - start].fill(0);
            bytes[last_page - start..].fill(0);
            return;
        }
    }
    bytes.fill(0);
}

/// A request for the next memory this thread creates: see [`create_unzeroed`] and
/// [`create_tracked`].
enum Request {
    Unzeroed {
        size: usize,
    },
    Tracked {
        size: usize,
        image: Option<Arc<HeapImage>>,
    },
}

impl Request {
    fn size(&self) -> usize {
        match self {
            Request::Unzeroed { size } | Request::Tracked { size, .. } => *size,
        }
    }
}

thread_local! {
    static REQUEST: RefCell<Option<Request>> = const { RefCell::new(None) };
    static UNZEROED_DIRTY: Cell<usize> = const { Cell::new(0) };
    static MAPPED_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// Runs `instantiate` so that the linear memory it creates (if any) starts at `size` bytes
/// instead of the module's minimum (as if grown right away; ignored if `size` is below the
/// minimum or above the maximum) and is *not* zeroed. Returns `instantiate`'s result and the
/// length of the prefix that may hold stale bytes (0 if no memory was created): before any wasm
/// runs, the caller must overwrite every byte of `0..min(dirty, size)`. See Note [recycled linear
/// memories].
pub(crate) fn create_unzeroed<R>(size: usize, instantiate: impl FnOnce() -> R) -> (R, usize) {
    REQUEST.with(|r| *r.borrow_mut() = Some(Request::Unzeroed { size }));
    UNZEROED_DIRTY.with(|d| d.set(0));
    let result = instantiate();
    REQUEST.with(|r| r.borrow_mut().take());
    (result, UNZEROED_DIRTY.with(|d| d.replace(0)))
}

/// Runs `instantiate` so that the linear memory it creates (if any) starts at `size` bytes (as
/// [`create_unzeroed`]), reads as zeros with none of its pages resident, and, with `image`, has
/// the image's file mapped copy-on-write over its first `min(size, image.len())` bytes, so that
/// afterwards [`touched_pages`] names every page an execution wrote. Returns `instantiate`'s
/// result and how many bytes the image covers (0 if it could not be mapped: the memory then
/// reads as zeros and the caller must copy the whole heap in). See Note [tracked heaps].
pub(crate) fn create_tracked<R>(
    size: usize,
    image: Option<Arc<HeapImage>>,
    instantiate: impl FnOnce() -> R,
) -> (R, usize) {
    REQUEST.with(|r| *r.borrow_mut() = Some(Request::Tracked { size, image }));
    MAPPED_BYTES.with(|m| m.set(0));
    let result = instantiate();
    REQUEST.with(|r| r.borrow_mut().take());
    (result, MAPPED_BYTES.with(|m| m.replace(0)))
}

/// `/proc/self/pagemap`, opened once, if it passes a self-test; `None` where there is no procfs or
/// where it does not report written pages faithfully (every page is then compared).
fn pagemap() -> Option<&'static std::fs::File> {
    static PAGEMAP: OnceLock<Option<std::fs::File>> = OnceLock::new();
    PAGEMAP
        .get_or_init(|| {
            let file = std::fs::File::open("/proc/self/pagemap").ok()?;
            if pagemap_reports_writes(&file) {
                Some(file)
            } else {
                tracing::warn!(
                    "/proc/self/pagemap does not report written pages faithfully; large heaps are compared whole"
                );
                None
            }
        })
        .as_ref()
}

/// Whether `file` names exactly the page written in a private mapping of a memory file, after
/// another was only read: the property Note [tracked heaps] relies on.
fn pagemap_reports_writes(file: &std::fs::File) -> bool {
    let check = || -> Option<bool> {
        let memfd =
            rustix::fs::memfd_create("openic-pagemap-check", rustix::fs::MemfdFlags::CLOEXEC)
                .ok()?;
        rustix::fs::ftruncate(&memfd, 4 * OS_PAGE_BYTES as u64).ok()?;
        rustix::io::pwrite(&memfd, &[1u8; OS_PAGE_BYTES], 0).ok()?;
        // SAFETY: a fresh private mapping of the file at an address the kernel chooses aliases
        // nothing; it is unmapped before returning and the file is as long as the mapping.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                4 * OS_PAGE_BYTES,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
                &memfd,
                0,
            )
        }
        .ok()?;
        // SAFETY: the mapping is 4 pages long, readable and writable, and only used here.
        let bytes = unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), 4 * OS_PAGE_BYTES) };
        let read = std::hint::black_box(bytes[0]);
        bytes[2 * OS_PAGE_BYTES] = read.wrapping_add(1);
        let scanned = match touched_pages_by_scan(file, bytes) {
            Ok(pages) => Some(pages),
            Err(_) => touched_pages_by_reading(file, bytes),
        };
        // SAFETY: the mapping made above, of this length, no longer used.
        let _ = unsafe { rustix::mm::munmap(base, 4 * OS_PAGE_BYTES) };
        Some(scanned? == vec![2])
    };
    check().unwrap_or(false)
}

/// `struct pm_scan_arg` of `<linux/fs.h>` (Linux 6.7+).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// The `PAGEMAP_SCAN` ioctl, which returns how many regions it filled.
struct PagemapScan<'a>(&'a mut PmScanArg);

// SAFETY: PAGEMAP_SCAN is `_IOWR('f', 16, struct pm_scan_arg)`; the kernel reads and updates the
// argument (`walk_end`) and writes at most `vec_len` `page_region`s to `vec`, which the caller
// points at a buffer of that many.
unsafe impl rustix::ioctl::Ioctl for PagemapScan<'_> {
    type Output = usize;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> rustix::ioctl::Opcode {
        rustix::ioctl::opcode::read_write::<PmScanArg>(b'f', 16)
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        (self.0 as *mut PmScanArg).cast()
    }
    unsafe fn output_from_ptr(
        out: rustix::ioctl::IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<usize> {
        Ok(out as usize)
    }
}

/// The pages of `memory` (indexes from its start, ascending, each once) that may have been written
/// since it was made by [`create_tracked`]: every page that is not the image file's, present or
/// swapped out. May name pages that were only read (memory grown during the execution, pages
/// copied in before it ran); never misses a written one. `None` if the kernel cannot say (no
/// procfs), in which case every page must be assumed written.
pub(crate) fn touched_pages(memory: &[u8]) -> Option<Vec<u64>> {
    let file = pagemap()?;
    match touched_pages_by_scan(file, memory) {
        Ok(pages) => Some(pages),
        // Kernels before 6.7: read the page table entries one by one.
        Err(_) => touched_pages_by_reading(file, memory),
    }
}

/// [`touched_pages`] with the `PAGEMAP_SCAN` ioctl (Linux 6.7+), which walks only the populated
/// page tables and returns runs of matching pages.
fn touched_pages_by_scan(file: &std::fs::File, memory: &[u8]) -> rustix::io::Result<Vec<u64>> {
    let start = memory.as_ptr() as usize;
    debug_assert!(start.is_multiple_of(OS_PAGE_BYTES));
    let end = start + memory.len().div_ceil(OS_PAGE_BYTES) * OS_PAGE_BYTES;
    let mut pages = Vec::new();
    let mut regions = vec![PageRegion::default(); 512];
    let mut from = start as u64;
    while from < end as u64 {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: from,
            end: end as u64,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_inverted: PAGE_IS_FILE,
            category_mask: PAGE_IS_FILE,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..PmScanArg::default()
        };
        // SAFETY: `regions` has `vec_len` entries and outlives the call; the scanned range is
        // this process's own memory and is only read (no write-protect flags).
        let filled = unsafe { rustix::ioctl::ioctl(file, PagemapScan(&mut arg)) }?;
        for region in &regions[..filled.min(regions.len())] {
            let first = (region.start - start as u64) / OS_PAGE_BYTES as u64;
            let last = (region.end - start as u64) / OS_PAGE_BYTES as u64;
            pages.extend(first..last);
        }
        if arg.walk_end <= from {
            break;
        }
        from = arg.walk_end;
    }
    Ok(pages)
}

/// [`touched_pages`] from `/proc/self/pagemap` entries (8 bytes per page: bit 63 present, 62
/// swapped, 61 a file page), for kernels without `PAGEMAP_SCAN`.
fn touched_pages_by_reading(file: &std::fs::File, memory: &[u8]) -> Option<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let first_page = memory.as_ptr() as u64 / OS_PAGE_BYTES as u64;
    let count = memory.len().div_ceil(OS_PAGE_BYTES);
    let mut pages = Vec::new();
    let mut entries = vec![0u8; 8 * 4096];
    let mut done = 0usize;
    while done < count {
        let n = (count - done).min(entries.len() / 8);
        let bytes = &mut entries[..n * 8];
        file.read_exact_at(bytes, (first_page + done as u64) * 8)
            .ok()?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]));
            let in_memory = entry & (1 << 63 | 1 << 62) != 0;
            let file_page = entry & (1 << 61) != 0 && entry & (1 << 62) == 0;
            if in_memory && !file_page {
                pages.push((done + i) as u64);
            }
        }
        done += n;
    }
    Some(pages)
}

// SAFETY: memories read as zeros (fresh mappings, or pooled ones zeroed over their dirty prefix)
// except for a memory requested through `create_unzeroed`, whose caller overwrites the stale
// prefix before wasm runs, and one requested through `create_tracked` with an image, which reads
// as the image's bytes that its caller then brings up to the canister's heap before wasm runs; the first `byte_size` bytes are accessible, and at least
// `reserved_size_in_bytes + guard_size_in_bytes` bytes are reserved, with everything past the
// accessible part inaccessible, as wasmtime's compiled code assumes when it elides bounds checks.
unsafe impl MemoryCreator for RecyclingMemoryCreator {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        // Only the first memory of the instantiation is meant (a module has at most one).
        let request = REQUEST.with(|r| r.borrow_mut().take());
        let size = match request.as_ref().map(Request::size) {
            Some(size) if size >= minimum && maximum.is_none_or(|maximum| size <= maximum) => size,
            _ => minimum,
        };
        let len =
            round_up_to_os_page(size).ok_or_else(|| "wasm memory size overflows".to_string())?;
        let reserved = reserved_size_in_bytes.unwrap_or(len);
        let guard = round_up_to_os_page(guard_size_in_bytes)
            .ok_or_else(|| "wasm memory guard size overflows".to_string())?;
        let (mut region, pooled) = if len <= reserved {
            match self.pool.take(reserved, guard) {
                Some(region) => (region, true),
                None => (Region::reserve(reserved, guard)?, true),
            }
        } else {
            (Region::reserve(len, guard)?, false)
        };
        region.set_accessible(len)?;
        let mut image = None;
        match request {
            Some(Request::Unzeroed { .. }) => {
                UNZEROED_DIRTY.with(|d| d.set(region.dirty.min(len)));
            }
            Some(Request::Tracked { image: wanted, .. }) => {
                // Nothing resident: every page the execution writes becomes one.
                if region.discard_dirty().is_none() {
                    // The region keeps resident zeros; they read as written, which only costs
                    // comparisons.
                    region.zero(0, len);
                }
                if let Some(wanted) = wanted {
                    let mapped = (wanted.len() / OS_PAGE_BYTES * OS_PAGE_BYTES).min(len);
                    if mapped > 0 {
                        match region.map_file(&wanted, mapped) {
                            Ok(()) => {
                                MAPPED_BYTES.with(|m| m.set(mapped));
                                image = Some(wanted);
                            }
                            // Not mapped, the region intact: the caller copies the heap in.
                            Err(MapError::NotMapped(why)) => {
                                tracing::warn!(%why, "a heap image was not mapped; copying the heap in");
                            }
                            // The region has a hole: it must not be used.
                            Err(MapError::Broken(why)) => return Err(why),
                        }
                    }
                }
            }
            None => region.zero(0, len),
        }
        Ok(Box::new(RecycledMemory {
            region: Some(region),
            size,
            maximum,
            pooled,
            pool: self.pool.clone(),
            image,
        }))
    }
}

/// A linear memory in a (possibly recycled) region.
#[derive(Debug)]
struct RecycledMemory {
    region: Option<Region>,
    size: usize,
    maximum: Option<usize>,
    /// Whether the region has the standard shape and goes back to the pool when released.
    pooled: bool,
    pool: Arc<Pool>,
    /// The heap image mapped over the region's start, kept open while it is mapped.
    image: Option<Arc<HeapImage>>,
}

impl RecycledMemory {
    fn region(&self) -> &Region {
        self.region
            .as_ref()
            .expect("a live memory always holds its region")
    }
}

// SAFETY: see the `MemoryCreator` impl; growth within the capacity never moves the base, and a
// move (past the capacity) copies the bytes into a new region of the same shape.
unsafe impl LinearMemory for RecycledMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.region().capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if let Some(maximum) = self.maximum
            && new_size > maximum
        {
            wasmtime::bail!("cannot grow a wasm memory past its maximum of {maximum} bytes");
        }
        let len = round_up_to_os_page(new_size)
            .ok_or_else(|| wasmtime::format_err!("wasm memory size overflows"))?;
        let capacity = self.region().capacity;
        if len <= capacity {
            let old_len = round_up_to_os_page(self.size).unwrap_or(usize::MAX);
            let region = self
                .region
                .as_mut()
                .expect("a live memory holds its region");
            if len > region.accessible {
                region.set_accessible(len).map_err(wasmtime::Error::msg)?;
            }
            // New wasm pages read as zeros.
            region.zero(old_len, len);
        } else {
            // Only a memory whose maximum exceeds wasmtime's reservation (memory64) gets here:
            // move to a mapping that fits with room to grow, keeping the same guard.
            let old = self.region();
            let new_capacity = round_up_to_os_page(len.max(capacity.saturating_mul(2)))
                .ok_or_else(|| wasmtime::format_err!("wasm memory size overflows"))?;
            let mut moved =
                Region::reserve(new_capacity, old.guard).map_err(wasmtime::Error::msg)?;
            moved.set_accessible(len).map_err(wasmtime::Error::msg)?;
            // SAFETY: both ranges are accessible for `self.size` bytes and belong to different
            // mappings.
            unsafe { std::ptr::copy_nonoverlapping(old.base, moved.base, self.size) };
            moved.dirty = self.size;
            self.region = Some(moved);
            // The old region is unmapped when dropped here; the new one has a non-standard
            // shape and is not pooled.
            self.pooled = false;
        }
        self.size = new_size;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.region().base
    }
}

impl Drop for RecycledMemory {
    fn drop(&mut self) {
        if let Some(mut region) = self.region.take()
            && self.pooled
            && region.unmap_file()
        {
            self.pool.give_back(region);
        }
        // The image's file may change once no memory maps it.
        self.image = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    fn new(creator: &RecyclingMemoryCreator, minimum: usize) -> Box<dyn LinearMemory> {
        creator
            .new_memory(
                MemoryType::new(0, None),
                minimum,
                None,
                Some(4 * GIB),
                32 << 20,
            )
            .expect("memory")
    }

    fn bytes(memory: &mut dyn LinearMemory) -> &mut [u8] {
        // SAFETY: the memory is live, `byte_size` bytes are accessible, and the `&mut` borrow
        // makes the slice the only access.
        unsafe { std::slice::from_raw_parts_mut(memory.as_ptr(), memory.byte_size()) }
    }

    #[test]
    fn a_released_memory_is_reused_and_reads_as_zeros() {
        let creator = RecyclingMemoryCreator::new();
        let mut first = new(&creator, 2 * 65536);
        let base = first.as_ptr();
        bytes(&mut *first).fill(7);
        first.grow_to(KEEP_RESIDENT_BYTES + 3 * 65536).unwrap();
        bytes(&mut *first).fill(9);
        drop(first);
        assert_eq!(creator.idle(), 1);

        let mut second = new(&creator, 65536);
        assert_eq!(second.as_ptr(), base, "the reservation is reused");
        assert_eq!(creator.idle(), 0);
        assert!(bytes(&mut *second).iter().all(|b| *b == 0));
        second.grow_to(KEEP_RESIDENT_BYTES + 3 * 65536).unwrap();
        assert!(
            bytes(&mut *second).iter().all(|b| *b == 0),
            "pages past the resident part read as zeros too"
        );
    }

    #[test]
    fn idle_regions_give_their_resident_pages_back_after_one_period() {
        let creator = RecyclingMemoryCreator::new();
        let mut memory = new(&creator, 2 * 65536);
        bytes(&mut *memory).fill(3);
        drop(memory);
        // Given back in this period: kept warm.
        assert_eq!(creator.release_idle(), 0);
        // Still idle a period later: its dirty pages go back to the kernel.
        assert_eq!(creator.release_idle(), 2 * 65536);
        assert_eq!(creator.release_idle(), 0, "nothing left to discard");
        assert_eq!(creator.idle(), 1, "the reservation itself stays pooled");
        let (mut reused, stale) = create_unzeroed(2 * 65536, || new(&creator, 65536));
        assert_eq!(stale, 0, "a discarded region holds no stale bytes");
        assert!(bytes(&mut *reused).iter().all(|b| *b == 0));
    }

    #[test]
    fn an_unzeroed_memory_reports_its_stale_prefix_and_growth_still_zeroes() {
        let creator = RecyclingMemoryCreator::new();
        let mut first = new(&creator, 4 * 65536);
        bytes(&mut *first).fill(5);
        drop(first);
        let (memory, stale) = create_unzeroed(2 * 65536, || new(&creator, 65536));
        let mut memory = memory;
        assert_eq!(
            memory.byte_size(),
            2 * 65536,
            "starts at the requested size"
        );
        assert_eq!(stale, 2 * 65536, "all of it may be stale");
        zero_heap_range(&mut bytes(&mut *memory)[100..]);
        assert!(bytes(&mut *memory)[100..].iter().all(|b| *b == 0));
        assert!(bytes(&mut *memory)[..100].iter().all(|b| *b == 5));
        memory.grow_to(4 * 65536).unwrap();
        assert!(
            bytes(&mut *memory)[2 * 65536..].iter().all(|b| *b == 0),
            "growth exposes zeros, not the previous user's bytes"
        );
        drop(memory);
        let (_, stale) = create_unzeroed(65536, || ());
        assert_eq!(stale, 0, "no memory created, nothing stale");
    }

    #[test]
    fn growth_past_the_reservation_moves_and_keeps_contents() {
        let creator = RecyclingMemoryCreator::new();
        let mut memory = creator
            .new_memory(
                MemoryType::new(0, None),
                65536,
                None,
                Some(128 * 1024),
                65536,
            )
            .unwrap();
        bytes(&mut *memory)[..4].copy_from_slice(&[1, 2, 3, 4]);
        memory.grow_to(512 * 1024).unwrap();
        assert_eq!(memory.byte_size(), 512 * 1024);
        assert!(memory.byte_capacity() >= 512 * 1024);
        assert_eq!(&bytes(&mut *memory)[..4], &[1, 2, 3, 4]);
        assert!(bytes(&mut *memory)[4..].iter().all(|b| *b == 0));
        drop(memory);
        assert_eq!(creator.idle(), 0, "a moved memory is not pooled");
    }

    #[test]
    fn growth_past_the_maximum_fails() {
        let creator = RecyclingMemoryCreator::new();
        let mut memory = creator
            .new_memory(
                MemoryType::new(1, Some(1)),
                65536,
                Some(65536),
                Some(4 * GIB),
                32 << 20,
            )
            .unwrap();
        assert!(memory.grow_to(2 * 65536).is_err());
        assert_eq!(memory.byte_size(), 65536);
    }

    #[test]
    fn a_tracked_memory_shows_its_image_and_names_exactly_the_written_pages() {
        use openic_replicated_state::{PAGE_SIZE, PageMap};
        let creator = RecyclingMemoryCreator::new();
        // A previous user leaves resident, non-zero pages behind.
        let mut first = new(&creator, 2 * 65536);
        bytes(&mut *first).fill(1);
        drop(first);
        let mut map = PageMap::new();
        for index in 0..10 {
            map.set_page(index, &[index as u8 + 1; PAGE_SIZE]);
        }
        let image = Arc::new(HeapImage::build(&map, 64 * PAGE_SIZE).unwrap());
        let (memory, mapped) = create_tracked(128 * PAGE_SIZE, Some(image.clone()), || {
            new(&creator, 65536)
        });
        let mut memory = memory;
        assert_eq!(mapped, 64 * PAGE_SIZE);
        let heap = bytes(&mut *memory);
        assert_eq!(heap[3 * PAGE_SIZE], 4, "the image's bytes show");
        assert_eq!(heap[20 * PAGE_SIZE], 0, "holes of the image read as zeros");
        assert_eq!(
            heap[100 * PAGE_SIZE],
            0,
            "past the image: zeros, not the old user's"
        );
        assert_eq!(
            touched_pages(heap),
            Some(vec![100]),
            "reading the image names nothing; past it, a page read may be named"
        );
        heap[5 * PAGE_SIZE + 9] = 7;
        heap[70 * PAGE_SIZE] = 7;
        heap[127 * PAGE_SIZE + 4095] = 7;
        assert_eq!(touched_pages(heap), Some(vec![5, 70, 100, 127]));
        assert_eq!(
            touched_pages_by_reading(pagemap().unwrap(), heap),
            Some(vec![5, 70, 100, 127]),
            "the fallback agrees"
        );
        let kernel = rustix::system::uname();
        let release = kernel.release().to_string_lossy();
        let mut version = release
            .split(['.', '-'])
            .map(|n| n.parse::<u32>().unwrap_or(0));
        if (version.next().unwrap_or(0), version.next().unwrap_or(0)) >= (6, 7) {
            assert_eq!(
                touched_pages_by_scan(pagemap().unwrap(), heap).ok(),
                Some(vec![5, 70, 100, 127]),
                "PAGEMAP_SCAN is used on Linux {release}"
            );
        }
        drop(memory);
        assert_eq!(
            Arc::strong_count(&image),
            1,
            "the memory let go of the image"
        );
        // The region is reused without the file: it reads as zeros.
        let mut again = new(&creator, 2 * 65536);
        assert!(bytes(&mut *again).iter().all(|b| *b == 0));
    }

    #[test]
    fn the_pool_is_bounded() {
        let creator = RecyclingMemoryCreator::new();
        let memories: Vec<_> = (0..MAX_IDLE_REGIONS + 3)
            .map(|_| new(&creator, 65536))
            .collect();
        drop(memories);
        assert_eq!(creator.idle(), MAX_IDLE_REGIONS);
    }
}
