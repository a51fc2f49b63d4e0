//! [`WasmtimeEmbedder`]: the [`Embedder`] on wasmtime.
//!
//! One engine and two linkers (wasm32, memory64) per process; compiled modules are cached by
//! module hash. Every execution gets a fresh store and instance (see Note [instance-free state]
//! in `instrumentation`): the heap image and globals are put in, the entry point runs under a
//! fuel limit, and on success the heap is compared back into a copy-on-write [`PageMap`], so only
//! changed pages are stored anew. A small heap is copied in and compared back whole; a large one
//! is mapped from a file image and only the pages the execution wrote are compared (Note
//! [tracked heaps] in `heap_image`).

use crate::api::{
    Embedder, EntryPoint, ExecutionError, InvalidWasm, NewExecutionState, SlicedExecution,
    WasmExecutionInput, WasmExecutionOutput,
};
use crate::config::{
    DATA_SEGMENT_INSTRUCTION_LIMIT, EmbedderConfig, EmbedderError, MAX_WASM32_MEMORY_BYTES,
    WASM_PAGE_BYTES, build_engine_with,
};
use crate::heap_image::{HeapImage, HeapImages, TRACKED_HEAP_MIN_BYTES};
use crate::imports::Context;
use crate::instrumentation::{
    INIT_DATA_EXPORT, MEMORY_EXPORT, PROBE_EXPORT, START_EXPORT, TABLE_EXPORT, global_export,
    instrument,
};
use crate::linker::{GrowthLimits, HostError, MemoryLease, StoreData, build_linker};
use crate::memory_pool::{
    RecyclingMemoryCreator, create_tracked, create_unzeroed, touched_pages, zero_heap_range,
};
use crate::sliced::{EpochTicker, SliceControl, WorkerExecution, Workers};
use crate::system_api::SystemApi;
use crate::validation::{decode, validate};
use openic_replicated_state::{
    ExecutionState, GlobalValue, ModuleInfo, PAGE_SIZE, PageMap, WasmBinary,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use wasmtime::{
    Engine, Extern, InstancePre, Linker, Module, ModuleExport, Ref, Store, Trap, UpdateDeadline,
    V128, Val, ValType,
};

/// A compiled, linked module and the handles of its reserved exports.
struct CompiledModule {
    instance_pre: InstancePre<StoreData>,
    is_wasm64: bool,
    memory: Option<ModuleExport>,
    table: Option<ModuleExport>,
    start: Option<ModuleExport>,
    /// The slice probe global (Note [slice probes] in `instrumentation`).
    probe: Option<ModuleExport>,
    init_data: ModuleExport,
    globals: Vec<(ModuleExport, ValType)>,
}

/// Compiled modules by module hash, least recently used evicted first.
struct ModuleCache {
    entries: BTreeMap<[u8; 32], (Arc<CompiledModule>, u64)>,
    clock: u64,
    capacity: usize,
}

impl ModuleCache {
    fn get(&mut self, hash: &[u8; 32]) -> Option<Arc<CompiledModule>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(hash).map(|(module, used)| {
            *used = clock;
            module.clone()
        })
    }

    fn insert(&mut self, hash: [u8; 32], module: Arc<CompiledModule>) {
        self.clock += 1;
        while self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(hash, _)| *hash);
            match oldest {
                Some(oldest) => self.entries.remove(&oldest),
                None => break,
            };
        }
        self.entries.insert(hash, (module, self.clock));
    }
}

/// How an instance's linear memory starts.
enum MemoryStart {
    /// At this size, possibly holding stale bytes ([`create_unzeroed`]).
    Unzeroed(usize),
    /// At this size, zero or mapped from the image, with nothing resident ([`create_tracked`]).
    Tracked(usize, Option<Arc<HeapImage>>),
}

/// The wasmtime embedder. Cheap to share (`Arc`) between the block and query threads.
pub struct WasmtimeEmbedder {
    config: EmbedderConfig,
    engine: Engine,
    linker32: Linker<StoreData>,
    linker64: Linker<StoreData>,
    cache: Mutex<ModuleCache>,
    /// The engine's pool of linear memories.
    memories: RecyclingMemoryCreator,
    /// File images of the largest heaps (Note [tracked heaps]).
    images: HeapImages,
    /// Threads that run sliced executions, and the epoch ticker that lets them notice where they
    /// are (Note [sliced executions] in `sliced`).
    workers: Workers,
    ticker: EpochTicker,
}

/// The epoch deadline of a store whose execution is not sliced: never reached.
const NO_EPOCH_DEADLINE: u64 = u64::MAX / 2;

impl std::fmt::Debug for WasmtimeEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmtimeEmbedder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn wasm_error(e: impl std::fmt::Display) -> ExecutionError {
    ExecutionError::Instantiation(e.to_string())
}

/// Turns a wasmtime error from running wasm into the execution error it stands for.
fn classify(error: wasmtime::Error, limit: u64) -> ExecutionError {
    if let Some(HostError(e)) = error.downcast_ref::<HostError>() {
        return e.clone();
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        // The IC's names for wasm traps (`TrapCode`), which canisters' tests match on.
        let code = match trap {
            Trap::OutOfFuel => return ExecutionError::InstructionLimitExceeded { limit },
            Trap::BadSignature => {
                return ExecutionError::ContractViolation(
                    "function invocation does not match its signature".to_string(),
                );
            }
            Trap::UnreachableCodeReached => "unreachable",
            Trap::MemoryOutOfBounds => "heap out of bounds",
            Trap::IntegerDivisionByZero => "integer division by 0",
            Trap::StackOverflow => "stack overflow",
            Trap::TableOutOfBounds => "table out of bounds",
            _ => "unknown",
        };
        return ExecutionError::Trapped(code.to_string());
    }
    ExecutionError::Trapped(format!("{error:#}"))
}

fn read_global(value: Val) -> Result<GlobalValue, ExecutionError> {
    Ok(match value {
        Val::I32(v) => GlobalValue::I32(v),
        Val::I64(v) => GlobalValue::I64(v),
        Val::F32(bits) => GlobalValue::F32(bits),
        Val::F64(bits) => GlobalValue::F64(bits),
        Val::V128(v) => GlobalValue::V128(v.as_u128()),
        other => {
            return Err(wasm_error(format!(
                "global of unsupported type {:?}",
                other
            )));
        }
    })
}

fn global_val(value: GlobalValue) -> Val {
    match value {
        GlobalValue::I32(v) => Val::I32(v),
        GlobalValue::I64(v) => Val::I64(v),
        GlobalValue::F32(bits) => Val::F32(bits),
        GlobalValue::F64(bits) => Val::F64(bits),
        GlobalValue::V128(v) => Val::V128(V128::from(v)),
    }
}

/// Instructions charged per 4 KiB heap page whose contents a message changed (the work of storing
/// it in the new state). What an execution costs depends on the pages it writes, never on how
/// large the heap is (Note [tracked heaps] in `heap_image`).
pub const HEAP_PAGE_WRITE_INSTRUCTIONS: u64 = 256;

/// An all-zero page, to compare against with `memcmp`.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Makes `map` equal to the heap image `heap`, storing anew only the pages whose contents
/// changed (unchanged pages keep sharing their `Arc` with the previous state). Same result as
/// `PageMap::update_from_slice`, with whole-page `memcmp`s instead of byte loops. Returns how many
/// pages changed.
fn update_page_map(map: &mut PageMap, heap: &[u8]) -> u64 {
    let mut changed = 0;
    let mut full_pages = heap.chunks_exact(PAGE_SIZE);
    for (index, chunk) in full_pages.by_ref().enumerate() {
        changed += u64::from(update_page(map, index as u64, chunk));
    }
    let rest = full_pages.remainder();
    let whole = (heap.len() / PAGE_SIZE) as u64;
    if !rest.is_empty() {
        let mut page = [0u8; PAGE_SIZE];
        page[..rest.len()].copy_from_slice(rest);
        changed += u64::from(update_page(map, whole, &page));
    }
    let end = heap.len().div_ceil(PAGE_SIZE) as u64;
    changed += map.pages().skip_while(|(i, _)| *i < end).count() as u64;
    map.truncate(end);
    changed
}

/// Makes page `index` of `map` equal to `bytes` (one whole page); returns whether it changed.
fn update_page(map: &mut PageMap, index: u64, bytes: &[u8]) -> bool {
    let unchanged = match map.page(index) {
        Some(page) => page[..] == *bytes,
        None => bytes == &ZERO_PAGE[..],
    };
    if !unchanged {
        let mut page = [0u8; PAGE_SIZE];
        page.copy_from_slice(bytes);
        map.set_page(index, &page);
    }
    !unchanged
}

/// Makes `map` equal to the heap image `heap` given that only the pages `touched` (ascending) can
/// differ (Note [tracked heaps]); without that list, compares every page. Returns how many pages
/// changed.
fn update_page_map_touched(map: &mut PageMap, heap: &[u8], touched: Option<Vec<u64>>) -> u64 {
    let Some(touched) = touched else {
        return update_page_map(map, heap);
    };
    let mut changed = 0;
    for index in touched {
        let start = index as usize * PAGE_SIZE;
        let Some(bytes) = heap.get(start..(start + PAGE_SIZE).min(heap.len())) else {
            continue;
        };
        if bytes.len() == PAGE_SIZE {
            changed += u64::from(update_page(map, index, bytes));
        } else {
            let mut page = [0u8; PAGE_SIZE];
            page[..bytes.len()].copy_from_slice(bytes);
            changed += u64::from(update_page(map, index, &page));
        }
    }
    // A heap only grows within an execution, so no stored page lies past it.
    changed
}

impl WasmtimeEmbedder {
    /// Builds the engine and the two linkers. Fails only if wasmtime refuses the configuration.
    pub fn new(config: EmbedderConfig) -> Result<Self, EmbedderError> {
        let memories = RecyclingMemoryCreator::new();
        let engine = build_engine_with(&config, memories.clone())?;
        let linker32 = build_linker::<i32>(&engine, true)
            .map_err(|e| EmbedderError::Linker(format!("{e:#}")))?;
        let linker64 = build_linker::<i64>(&engine, false)
            .map_err(|e| EmbedderError::Linker(format!("{e:#}")))?;
        let cache = Mutex::new(ModuleCache {
            entries: BTreeMap::new(),
            clock: 0,
            capacity: config.compiled_module_cache_entries,
        });
        let images = HeapImages::new(config.max_heap_image_bytes);
        let ticker = EpochTicker::new(engine.clone())
            .map_err(|e| EmbedderError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(WasmtimeEmbedder {
            config,
            engine,
            linker32,
            linker64,
            cache,
            memories,
            images,
            workers: Workers::new(),
            ticker,
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ModuleCache> {
        // A panic while holding the lock cannot leave the map inconsistent; keep using it.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Instruments and compiles a validated plain module.
    fn compile(&self, plain: &[u8], is_wasm64: bool) -> Result<CompiledModule, InvalidWasm> {
        let instrumented = instrument(plain)?;
        let module = Module::from_binary(&self.engine, &instrumented.bytes)
            .map_err(|e| InvalidWasm::Compilation(format!("{e:#}")))?;
        let linker = if is_wasm64 {
            &self.linker64
        } else {
            &self.linker32
        };
        let instance_pre = linker
            .instantiate_pre(&module)
            .map_err(|e| InvalidWasm::Validation(format!("imports do not resolve: {e:#}")))?;
        let export = |name: &str| module.get_export_index(name);
        let init_data = export(INIT_DATA_EXPORT).ok_or_else(|| {
            InvalidWasm::Compilation("the data-initialisation export is missing".to_string())
        })?;
        let mut globals = Vec::with_capacity(instrumented.mutable_globals.len());
        for (index, ty) in &instrumented.mutable_globals {
            let handle = export(&global_export(*index)).ok_or_else(|| {
                InvalidWasm::Compilation(format!("the export of global {index} is missing"))
            })?;
            let ty = match ty {
                wasmparser::ValType::I32 => ValType::I32,
                wasmparser::ValType::I64 => ValType::I64,
                wasmparser::ValType::F32 => ValType::F32,
                wasmparser::ValType::F64 => ValType::F64,
                _ => ValType::V128,
            };
            globals.push((handle, ty));
        }
        Ok(CompiledModule {
            is_wasm64,
            memory: export(MEMORY_EXPORT).filter(|_| instrumented.has_memory),
            table: export(TABLE_EXPORT).filter(|_| instrumented.has_table),
            start: export(START_EXPORT).filter(|_| instrumented.has_start),
            probe: export(PROBE_EXPORT),
            init_data,
            globals,
            instance_pre,
        })
    }

    /// The compiled module for an installed binary, compiling it on a cache miss (after a
    /// restart, or after eviction).
    fn compiled(&self, binary: &WasmBinary) -> Result<Arc<CompiledModule>, InvalidWasm> {
        if let Some(module) = self.cache().get(&binary.module_hash) {
            return Ok(module);
        }
        let plain = decode(&binary.bytes, self.config.max_module_bytes)?;
        let info = validate(&plain)?;
        let compiled = Arc::new(self.compile(&plain, info.is_wasm64)?);
        self.cache().insert(binary.module_hash, compiled.clone());
        Ok(compiled)
    }

    /// A fresh store and instance, its memory made as `memory` says. Returns, for
    /// [`MemoryStart::Unzeroed`], the prefix that [`Self::restore`] must overwrite (see
    /// [`create_unzeroed`]), and for [`MemoryStart::Tracked`] the bytes the image covers (see
    /// [`create_tracked`]).
    fn instantiate(
        &self,
        compiled: &CompiledModule,
        api: Option<SystemApi>,
        memory_limit_bytes: u64,
        instruction_limit: u64,
        memory: MemoryStart,
        lease: Option<MemoryLease>,
    ) -> Result<(Store<StoreData>, wasmtime::Instance, usize), ExecutionError> {
        let mut store = Store::new(
            &self.engine,
            StoreData {
                api,
                memory: None,
                limits: GrowthLimits {
                    memory_bytes: memory_limit_bytes,
                    trap_at_setting: None,
                    lease,
                },
                instruction_limit,
            },
        );
        store.limiter(|data| &mut data.limits);
        store.set_fuel(instruction_limit).map_err(wasm_error)?;
        // A sliced execution replaces this with its callback (`execute_inner`).
        store.set_epoch_deadline(NO_EPOCH_DEADLINE);
        let instantiate = |store: &mut Store<StoreData>| compiled.instance_pre.instantiate(store);
        let (instance, bytes) = match memory {
            MemoryStart::Unzeroed(size) => create_unzeroed(size, || instantiate(&mut store)),
            MemoryStart::Tracked(size, image) => {
                create_tracked(size, image, || instantiate(&mut store))
            }
        };
        let instance = instance.map_err(wasm_error)?;
        let memory = match &compiled.memory {
            Some(export) => instance
                .get_module_export(&mut store, export)
                .and_then(Extern::into_memory),
            None => None,
        };
        store.data_mut().memory = memory;
        Ok((store, instance, bytes))
    }

    /// Copies the canister's heap image and globals into a fresh instance, and zeroes the pages
    /// the image does not store within the first `stale_bytes` (which may hold a previous
    /// execution's bytes; see Note [recycled linear memories] in `memory_pool`), by discarding
    /// them if `discard_gaps` (the heap will not be read back).
    fn restore(
        compiled: &CompiledModule,
        store: &mut Store<StoreData>,
        instance: &wasmtime::Instance,
        state: &ExecutionState,
        stale_bytes: usize,
        discard_gaps: bool,
    ) -> Result<(), ExecutionError> {
        if let Some(memory) = store.data().memory {
            let current = memory.size(&*store);
            let target = state.wasm_memory_size_pages;
            if target < current {
                return Err(wasm_error(format!(
                    "the saved heap has {target} pages, fewer than the module's minimum of {current}"
                )));
            }
            if target > current {
                memory
                    .grow(&mut *store, target - current)
                    .map_err(|e| wasm_error(format!("could not restore the heap: {e:#}")))?;
            }
            let heap = memory.data_mut(&mut *store);
            let stale = stale_bytes.min(heap.len());
            // Zero the stale bytes not covered by stored pages: the gaps between them.
            let mut next_unwritten = 0usize;
            // Such gaps are mostly pages that were never touched (for example the unused part of
            // a Rust canister's stack). When the heap is thrown away afterwards, handing them back
            // to the kernel is cheapest: the few that are touched fault in as zeros. When it is
            // compared back (which reads every page, so a discarded page would fault), reading
            // them and writing only the non-zero ones is cheaper than writing them all.
            let zero_gap = |heap: &mut [u8], from: usize, to: usize| {
                let to = to.min(stale);
                if from >= to {
                    return;
                }
                if discard_gaps {
                    zero_heap_range(&mut heap[from..to]);
                } else {
                    for page in heap[from..to].chunks_mut(PAGE_SIZE) {
                        if *page != ZERO_PAGE[..page.len()] {
                            page.fill(0);
                        }
                    }
                }
            };
            for (index, page) in state.wasm_memory.pages() {
                let slot = usize::try_from(index)
                    .ok()
                    .and_then(|index| index.checked_mul(PAGE_SIZE))
                    .and_then(|start| heap.get_mut(start..start.checked_add(PAGE_SIZE)?));
                let Some(slot) = slot else {
                    return Err(wasm_error(format!(
                        "the saved heap has a page at index {index}, beyond its size of {target} wasm pages"
                    )));
                };
                slot.copy_from_slice(page);
                let start = index as usize * PAGE_SIZE;
                zero_gap(heap, next_unwritten, start);
                next_unwritten = start + PAGE_SIZE;
            }
            zero_gap(heap, next_unwritten, heap.len());
        }
        Self::restore_globals(compiled, store, instance, state)
    }

    /// Puts the canister's heap into a memory made by [`create_tracked`] (which already holds
    /// `image`'s bytes over its first `mapped` bytes, and zeros after them): the pages in which
    /// the state differs from the image, or every stored page without one; then the globals.
    fn restore_tracked(
        compiled: &CompiledModule,
        store: &mut Store<StoreData>,
        instance: &wasmtime::Instance,
        state: &ExecutionState,
        image: Option<&HeapImage>,
        mapped: usize,
    ) -> Result<(), ExecutionError> {
        if let Some(memory) = store.data().memory {
            let target = state.wasm_memory_size_pages;
            let current = memory.size(&*store);
            if target != current {
                return Err(wasm_error(format!(
                    "the saved heap has {target} wasm pages, the memory {current}"
                )));
            }
            let heap = memory.data_mut(&mut *store);
            let mut put = |index: u64, page: Option<&[u8; PAGE_SIZE]>| {
                let start = usize::try_from(index)
                    .ok()
                    .and_then(|index| index.checked_mul(PAGE_SIZE));
                let slot =
                    start.and_then(|start| heap.get_mut(start..start.checked_add(PAGE_SIZE)?));
                match (slot, page) {
                    (Some(slot), Some(page)) => slot.copy_from_slice(page),
                    (Some(slot), None) => slot.fill(0),
                    // A page gone since the image was made, past today's heap: nothing to clear.
                    (None, None) => {}
                    (None, Some(_)) => {
                        return Err(wasm_error(format!(
                            "the saved heap has a page at index {index}, beyond its size of {target} wasm pages"
                        )));
                    }
                }
                Ok(())
            };
            match image {
                Some(image) if mapped > 0 => {
                    for (index, page) in state.wasm_memory.changes_since(image.base()) {
                        put(index, page)?;
                    }
                }
                _ => {
                    for (index, page) in state.wasm_memory.pages() {
                        put(index, Some(page))?;
                    }
                }
            }
        }
        Self::restore_globals(compiled, store, instance, state)
    }

    fn restore_globals(
        compiled: &CompiledModule,
        store: &mut Store<StoreData>,
        instance: &wasmtime::Instance,
        state: &ExecutionState,
    ) -> Result<(), ExecutionError> {
        if compiled.globals.len() != state.globals.len() {
            return Err(wasm_error(format!(
                "the saved state has {} globals, the module {}",
                state.globals.len(),
                compiled.globals.len()
            )));
        }
        for ((export, _), value) in compiled.globals.iter().zip(&state.globals) {
            let global = instance
                .get_module_export(&mut *store, export)
                .and_then(Extern::into_global)
                .ok_or_else(|| wasm_error("a global export is missing"))?;
            global
                .set(&mut *store, global_val(*value))
                .map_err(|e| wasm_error(format!("could not restore a global: {e:#}")))?;
        }
        Ok(())
    }

    fn read_globals(
        compiled: &CompiledModule,
        store: &mut Store<StoreData>,
        instance: &wasmtime::Instance,
    ) -> Result<Vec<GlobalValue>, ExecutionError> {
        compiled
            .globals
            .iter()
            .map(|(export, _)| {
                let global = instance
                    .get_module_export(&mut *store, export)
                    .and_then(Extern::into_global)
                    .ok_or_else(|| wasm_error("a global export is missing"))?;
                read_global(global.get(&mut *store))
            })
            .collect()
    }

    /// Calls the entry point.
    fn run(
        compiled: &CompiledModule,
        store: &mut Store<StoreData>,
        instance: &wasmtime::Instance,
        entry_point: &EntryPoint,
        limit: u64,
    ) -> Result<(), ExecutionError> {
        let outcome = match entry_point {
            EntryPoint::Export(name) => {
                let func = instance
                    .get_func(&mut *store, name)
                    .ok_or_else(|| ExecutionError::no_export(name))?;
                let func = func
                    .typed::<(), ()>(&*store)
                    .map_err(|_| ExecutionError::no_export(name))?;
                func.call(&mut *store, ())
            }
            EntryPoint::StartOnly => match &compiled.start {
                None => Ok(()),
                Some(export) => {
                    let func = instance
                        .get_module_export(&mut *store, export)
                        .and_then(Extern::into_func)
                        .ok_or_else(|| wasm_error("the start export is missing"))?;
                    let func = func
                        .typed::<(), ()>(&*store)
                        .map_err(|e| ExecutionError::Trapped(format!("start function: {e:#}")))?;
                    func.call(&mut *store, ())
                }
            },
            EntryPoint::Closure(closure) => {
                let bad = |why: &str| {
                    ExecutionError::Trapped(format!(
                        "callback at table index {} cannot be called: {why}",
                        closure.func_idx
                    ))
                };
                let table = compiled
                    .table
                    .as_ref()
                    .and_then(|export| instance.get_module_export(&mut *store, export))
                    .and_then(Extern::into_table)
                    .ok_or_else(|| bad("the module has no table"))?;
                let func = match table.get(&mut *store, closure.func_idx) {
                    Some(Ref::Func(Some(func))) => func,
                    Some(_) => return Err(bad("the table entry is empty")),
                    None => return Err(bad("the index is out of the table's bounds")),
                };
                if compiled.is_wasm64 {
                    let func = func
                        .typed::<i64, ()>(&*store)
                        .map_err(|_| bad("it does not have type (i64) -> ()"))?;
                    func.call(&mut *store, closure.env as i64)
                } else {
                    let func = func
                        .typed::<i32, ()>(&*store)
                        .map_err(|_| bad("it does not have type (i32) -> ()"))?;
                    func.call(&mut *store, closure.env as u32 as i32)
                }
            }
        };
        outcome.map_err(|e| classify(e, limit))
    }

    fn execute_inner(
        &self,
        input: WasmExecutionInput<'_>,
        slicing: Option<&Arc<SliceControl>>,
        instructions_used: &mut u64,
        debug_prints: &mut Vec<Vec<u8>>,
    ) -> Result<
        (
            NewExecutionState,
            Option<crate::api::WasmResponse>,
            crate::api::SystemStateChanges,
        ),
        ExecutionError,
    > {
        let state = input.execution_state;
        let compiled = self
            .compiled(&state.wasm_binary)
            .map_err(|e| wasm_error(e.to_string()))?;
        let context = Context::of(&input.api_type);
        // Note: state changes of queries (also when run replicated, as an update or by another
        // canister) and of inspect_message are discarded by definition, so their heap is not
        // compared back (the input state is returned). Accepted cycles and the response still
        // come back in the System API outcome.
        let keeps_state = !matches!(
            context,
            Context::ReplicatedQuery | Context::NonReplicatedQuery | Context::InspectMessage
        );
        let canister = input.system_state.canister_id;
        let api = SystemApi::new(
            input.api_type,
            input.system_state,
            state.stable_memory.clone(),
            state.stable_memory_size_pages,
            input.stable_memory_limit_bytes,
            self.config.max_debug_print_bytes_per_execution,
        );
        let mut memory_limit = input.wasm_memory_limit_bytes;
        if !compiled.is_wasm64 {
            memory_limit = memory_limit.min(MAX_WASM32_MEMORY_BYTES);
        }
        let memory_limit =
            memory_limit.max(state.wasm_memory_size_pages.saturating_mul(WASM_PAGE_BYTES));
        let limit = input.instruction_limit;
        let heap_bytes = state.wasm_memory_size_pages.saturating_mul(WASM_PAGE_BYTES);
        // Under a memory budget, the heap image copied in is reserved before it is touched.
        let lease = match input.memory_budget {
            Some(budget) => {
                let mut lease = MemoryLease::new(budget);
                lease.cover_heap(heap_bytes)?;
                Some(lease)
            }
            None => None,
        };
        let tracked = heap_bytes >= TRACKED_HEAP_MIN_BYTES;
        let heap_len = usize::try_from(heap_bytes)
            .map_err(|_| wasm_error("the heap does not fit this machine's address space"))?;
        let image = if tracked {
            self.images
                .image_for(canister, &state.wasm_memory, heap_len)
        } else {
            None
        };
        let start = if tracked {
            MemoryStart::Tracked(heap_len, image.clone())
        } else {
            MemoryStart::Unzeroed(heap_len)
        };
        let (mut store, instance, start_bytes) =
            self.instantiate(&compiled, Some(api), memory_limit, limit, start, lease)?;
        // The setting traps where it applies (and where it, not the platform, is the bound).
        if input.wasm_memory_limit_traps && memory_limit == input.wasm_memory_limit_bytes {
            store.data_mut().limits.trap_at_setting = Some(input.wasm_memory_limit_bytes);
        }
        if let Some(control) = slicing {
            // At an epoch check: report the instructions used (a lower bound where wasmtime has
            // not stored its count yet), and wait while past the grant. Then set the slice probe,
            // so the next loop header stores the exact count and calls back at once with it, and
            // clear it on that call (Note [slice probes] in `instrumentation`).
            let control = Arc::clone(control);
            let probe = compiled
                .probe
                .as_ref()
                .and_then(|export| instance.get_module_export(&mut store, export))
                .and_then(Extern::into_global);
            let mut probing = false;
            store.epoch_deadline_callback(move |mut context| {
                let consumed = limit.saturating_sub(context.get_fuel()?);
                control.checkpoint(consumed)?;
                let Some(probe) = probe else {
                    return Ok(UpdateDeadline::Continue(1));
                };
                probing = !probing;
                probe.set(&mut context, Val::I32(i32::from(probing)))?;
                Ok(UpdateDeadline::Continue(if probing { 0 } else { 1 }))
            });
            store.set_epoch_deadline(1);
        }
        if tracked {
            Self::restore_tracked(
                &compiled,
                &mut store,
                &instance,
                state,
                image.as_deref(),
                start_bytes,
            )?;
        } else {
            Self::restore(
                &compiled,
                &mut store,
                &instance,
                state,
                start_bytes,
                !keeps_state,
            )?;
        }
        drop(image);

        let result = Self::run(&compiled, &mut store, &instance, &input.entry_point, limit);
        *instructions_used = limit.saturating_sub(store.get_fuel().unwrap_or(0));
        let api = store.data_mut().api.take();
        if let Err(error) = result {
            // The trap line goes through the same per-execution byte budget as debug_print.
            // As the IC logs traps: the message, or the trap's name.
            let line = match &error {
                ExecutionError::MethodNotFound(_) => None,
                ExecutionError::CalledTrap(message) if message.is_empty() => {
                    Some("[TRAP]: (no message)".to_string())
                }
                ExecutionError::CalledTrap(message) | ExecutionError::Trapped(message) => {
                    Some(format!("[TRAP]: {message}"))
                }
                other => Some(format!("[TRAP]: {other}")),
            };
            if let Some(mut api) = api {
                if let Some(line) = line {
                    api.record_debug_line(line.into_bytes());
                }
                *debug_prints = api.take_debug_prints();
            }
            return Err(error);
        }
        let outcome = api
            .ok_or_else(|| wasm_error("the System API state vanished"))?
            .finish();
        *debug_prints = outcome.debug_prints;
        let new_state = if keeps_state {
            let (wasm_memory, wasm_memory_size_pages) = match store.data().memory {
                Some(memory) => {
                    let mut image = state.wasm_memory.clone();
                    let heap = memory.data(&store);
                    let changed = if tracked {
                        update_page_map_touched(&mut image, heap, touched_pages(heap))
                    } else {
                        update_page_map(&mut image, heap)
                    };
                    // Storing the changed pages is work the message pays for.
                    let cost = changed.saturating_mul(HEAP_PAGE_WRITE_INSTRUCTIONS);
                    *instructions_used = instructions_used.saturating_add(cost);
                    if *instructions_used > limit {
                        *instructions_used = limit;
                        return Err(ExecutionError::InstructionLimitExceeded { limit });
                    }
                    (image, memory.size(&store))
                }
                None => (PageMap::new(), 0),
            };
            NewExecutionState {
                wasm_memory,
                wasm_memory_size_pages,
                stable_memory: outcome.stable_memory,
                stable_memory_size_pages: outcome.stable_memory_pages,
                globals: Self::read_globals(&compiled, &mut store, &instance)?,
            }
        } else {
            NewExecutionState {
                wasm_memory: state.wasm_memory.clone(),
                wasm_memory_size_pages: state.wasm_memory_size_pages,
                stable_memory: state.stable_memory.clone(),
                stable_memory_size_pages: state.stable_memory_size_pages,
                globals: state.globals.clone(),
            }
        };
        Ok((new_state, outcome.response, outcome.changes))
    }
}

impl Embedder for WasmtimeEmbedder {
    fn prepare_module(&self, wasm: &[u8]) -> Result<(WasmBinary, ModuleInfo), InvalidWasm> {
        let module_hash: [u8; 32] = Sha256::digest(wasm).into();
        let plain = decode(wasm, self.config.max_module_bytes)?;
        let info = validate(&plain)?;
        if self.cache().get(&module_hash).is_none() {
            let compiled = Arc::new(self.compile(&plain, info.is_wasm64)?);
            self.cache().insert(module_hash, compiled);
        }
        Ok((
            WasmBinary {
                bytes: wasm.to_vec(),
                module_hash,
            },
            info,
        ))
    }

    fn initial_execution_state(
        &self,
        binary: Arc<WasmBinary>,
        info: Arc<ModuleInfo>,
    ) -> Result<ExecutionState, InvalidWasm> {
        let compiled = self.compiled(&binary)?;
        let failed = |e: ExecutionError| {
            InvalidWasm::Validation(format!("the module cannot be instantiated: {e}"))
        };
        let (mut store, instance, _) = self
            .instantiate(
                &compiled,
                None,
                MAX_WASM32_MEMORY_BYTES,
                DATA_SEGMENT_INSTRUCTION_LIMIT,
                MemoryStart::Tracked(0, None),
                None,
            )
            .map_err(failed)?;
        let init = instance
            .get_module_export(&mut store, &compiled.init_data)
            .and_then(Extern::into_func)
            .ok_or_else(|| failed(wasm_error("the data-initialisation export is missing")))?
            .typed::<(), ()>(&store)
            .map_err(|e| failed(wasm_error(e)))?;
        init.call(&mut store, ()).map_err(|e| {
            InvalidWasm::Validation(format!(
                "applying the module's data segments failed: {}",
                classify(e, DATA_SEGMENT_INSTRUCTION_LIMIT)
            ))
        })?;
        // Only the pages the data segments wrote can be non-zero: a module that declares gigabytes
        // of initial memory is not read through.
        let (wasm_memory, wasm_memory_size_pages) = match store.data().memory {
            Some(memory) => {
                let heap = memory.data(&store);
                let mut map = PageMap::new();
                update_page_map_touched(&mut map, heap, touched_pages(heap));
                (map, memory.size(&store))
            }
            None => (PageMap::new(), 0),
        };
        let globals = Self::read_globals(&compiled, &mut store, &instance).map_err(failed)?;
        Ok(ExecutionState {
            wasm_binary: binary,
            module_info: info,
            wasm_memory,
            wasm_memory_size_pages,
            stable_memory: PageMap::new(),
            stable_memory_size_pages: 0,
            globals,
        })
    }

    fn release_idle_memory(&self) -> u64 {
        self.memories.release_idle() as u64
    }

    fn execute(&self, input: WasmExecutionInput<'_>) -> WasmExecutionOutput {
        let mut instructions_used = 0;
        let mut debug_prints = Vec::new();
        let result = self.execute_inner(input, None, &mut instructions_used, &mut debug_prints);
        WasmExecutionOutput {
            instructions_used,
            result,
            debug_prints,
        }
    }

    fn start_sliced(
        self: Arc<Self>,
        input: WasmExecutionInput<'_>,
        slice_instructions: u64,
    ) -> Box<dyn SlicedExecution> {
        let control = SliceControl::new(slice_instructions);
        let WasmExecutionInput {
            api_type,
            entry_point,
            execution_state,
            system_state,
            instruction_limit,
            wasm_memory_limit_bytes,
            wasm_memory_limit_traps,
            stable_memory_limit_bytes,
            memory_budget,
        } = input;
        // Cheap: the memories are persistent maps, the module an `Arc`.
        let execution_state = execution_state.clone();
        let worker_control = Arc::clone(&control);
        let embedder = Arc::clone(&self);
        let job = Box::new(move || {
            let _ticking = embedder.ticker.running();
            let input = WasmExecutionInput {
                api_type,
                entry_point,
                execution_state: &execution_state,
                system_state,
                instruction_limit,
                wasm_memory_limit_bytes,
                wasm_memory_limit_traps,
                stable_memory_limit_bytes,
                memory_budget,
            };
            let mut instructions_used = 0;
            let mut debug_prints = Vec::new();
            let result = embedder.execute_inner(
                input,
                Some(&worker_control),
                &mut instructions_used,
                &mut debug_prints,
            );
            worker_control.finish(WasmExecutionOutput {
                instructions_used,
                result,
                debug_prints,
            });
        });
        if let Err((job, error)) = self.workers.run(job) {
            // No thread to run it on (the machine is out of threads): run it here, to the end,
            // which changes when this node gets to the next block but not what any block does.
            tracing::error!(%error, "cannot start an execution thread; running the execution inline");
            control.grant(u64::MAX);
            job();
        }
        Box::new(WorkerExecution { control })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_page_map_matches_page_map_semantics() {
        let mut image = vec![0u8; PAGE_SIZE * 4 + 100];
        image[5] = 1;
        image[PAGE_SIZE * 4 + 50] = 3;
        let mut fast = PageMap::new();
        update_page_map(&mut fast, &image);
        assert_eq!(fast, PageMap::from_slice(&image));
        let before = fast.clone();
        image[PAGE_SIZE * 2] = 9;
        image[5] = 0;
        update_page_map(&mut fast, &image);
        assert_eq!(fast, PageMap::from_slice(&image));
        assert!(
            fast.shares_page_with(&before, 4),
            "unchanged pages keep their Arc"
        );
        update_page_map(&mut fast, &image[..PAGE_SIZE]);
        assert_eq!(fast, PageMap::from_slice(&image[..PAGE_SIZE]));
    }

    #[test]
    fn an_execution_lets_go_of_the_heap_image_it_mapped() {
        use crate::api::{ApiType, EntryPoint, SystemStateView, WasmExecutionInput};
        let embedder = WasmtimeEmbedder::new(EmbedderConfig::default()).unwrap();
        let wasm = wat::parse_str(
            r#"(module
                 (import "ic0" "msg_reply" (func $reply))
                 (memory (export "memory") 320)
                 (func (export "canister_update poke")
                   (i32.store8 (i32.const 70000) (i32.const 9))
                   (call $reply)))"#,
        )
        .unwrap();
        let (binary, info) = embedder.prepare_module(&wasm).unwrap();
        let mut state = embedder
            .initial_execution_state(Arc::new(binary), Arc::new(info))
            .unwrap();
        for index in 0..3000u64 {
            state.wasm_memory.set_page(index, &[1; PAGE_SIZE]);
        }
        let canister = openic_types::CanisterId::from_u64(7);
        let view = SystemStateView {
            canister_id: canister,
            controllers: Default::default(),
            status_code: 1,
            cycles_balance: openic_types::Cycles(1_000_000),
            freeze_threshold_cycles: openic_types::Cycles(0),
            canister_version: 1,
            time: openic_types::Time(0),
            subnet_id: openic_types::SubnetId(candid::Principal::management_canister()),
            subnet_node_count: 1,
            root_key_der: vec![],
            global_timer_nanos: 0,
            environment_variables: Default::default(),
            can_make_calls: true,
            call_base_fee: openic_types::Cycles(0),
            call_fee_per_byte: openic_types::Cycles(0),
            create_canister_fee: openic_types::Cycles(0),
            call_context_instructions: 0,
            remaining_callbacks: 10,
        };
        for _ in 0..3 {
            let output = embedder.execute(WasmExecutionInput {
                api_type: ApiType::Update {
                    caller: candid::Principal::anonymous(),
                    arg: vec![],
                    cycles_available: openic_types::Cycles(0),
                    deadline: 0,
                },
                entry_point: EntryPoint::Export("canister_update poke".to_string()),
                execution_state: &state,
                system_state: view.clone(),
                instruction_limit: 1_000_000,
                wasm_memory_limit_bytes: 1 << 30,
                wasm_memory_limit_traps: false,
                stable_memory_limit_bytes: 1 << 30,
                memory_budget: None,
            });
            let (new, _, _) = output.result.unwrap();
            state.wasm_memory = new.wasm_memory;
            assert_eq!(
                embedder.images.users(canister),
                Some(0),
                "after the execution only the cache holds the image"
            );
        }
    }

    #[test]
    fn cache_evicts_least_recently_used() {
        let embedder = WasmtimeEmbedder::new(EmbedderConfig {
            compiled_module_cache_entries: 2,
            ..EmbedderConfig::default()
        })
        .unwrap();
        let module = |n: u32| {
            wat::parse_str(format!("(module (func (export \"canister_update f{n}\")))")).unwrap()
        };
        let (a, _) = embedder.prepare_module(&module(1)).unwrap();
        let (b, _) = embedder.prepare_module(&module(2)).unwrap();
        assert!(embedder.cache().get(&a.module_hash).is_some());
        let (c, _) = embedder.prepare_module(&module(3)).unwrap();
        let mut cache = embedder.cache();
        assert!(
            cache.get(&b.module_hash).is_none(),
            "b was least recently used"
        );
        assert!(cache.get(&a.module_hash).is_some());
        assert!(cache.get(&c.module_hash).is_some());
    }

    #[test]
    fn every_import_in_the_table_resolves_with_its_signature() {
        use crate::imports::{IC0_IMPORTS, Ty};
        let embedder = WasmtimeEmbedder::new(EmbedderConfig::default()).unwrap();
        for (linker, wasm64) in [(&embedder.linker32, false), (&embedder.linker64, true)] {
            let mut store = Store::new(
                &embedder.engine,
                StoreData {
                    api: None,
                    memory: None,
                    limits: GrowthLimits {
                        memory_bytes: 0,
                        trap_at_setting: None,
                        lease: None,
                    },
                    instruction_limit: 0,
                },
            );
            for import in IC0_IMPORTS {
                let defined = linker.get(&mut store, "ic0", import.name).ok();
                if import.wasm32_only && wasm64 {
                    assert!(
                        defined.is_none(),
                        "{} must not exist for wasm64",
                        import.name
                    );
                    continue;
                }
                let func = defined
                    .and_then(Extern::into_func)
                    .unwrap_or_else(|| panic!("{} is not defined", import.name));
                let ty = func.ty(&store);
                let map = |t: &Ty| match (t, wasm64) {
                    (Ty::I32, _) | (Ty::Addr, false) => "i32",
                    (Ty::I64, _) | (Ty::Addr, true) => "i64",
                };
                let params: Vec<String> = ty.params().map(|p| p.to_string()).collect();
                let results: Vec<String> = ty.results().map(|p| p.to_string()).collect();
                let expected_params: Vec<&str> = import.params.iter().map(map).collect();
                let expected_results: Vec<&str> = import.results.iter().map(map).collect();
                assert_eq!(params, expected_params, "{}", import.name);
                assert_eq!(results, expected_results, "{}", import.name);
            }
        }
    }
}
