//! The embedder's configuration and the deterministic wasmtime engine built from it.
//!
//! Note [deterministic engine]: following wasmtime's "Deterministic Wasm Execution" checklist,
//! NaNs are canonicalised, execution is metered with fuel (1 fuel ≈ 1 instruction, bulk memory
//! operations charged per byte), threads, shared memory and relaxed SIMD are off, memory growth is
//! bounded by a resource limiter (so `memory.grow` fails at the same size everywhere), and the
//! wasm stack is bounded by a fixed size. Only features with deterministic semantics are enabled.

use crate::memory_pool::RecyclingMemoryCreator;
use std::sync::Arc;
use wasmtime::{Config, Engine, WasmFeatures};

/// Largest module accepted, plain or after gzip decompression (the IC's limit).
pub const MAX_MODULE_BYTES: usize = 100 * 1024 * 1024;
/// Largest code section accepted.
pub const MAX_CODE_SECTION_BYTES: usize = 10 * 1024 * 1024;
/// Most functions (imported and defined) a module may have.
pub const MAX_FUNCTIONS: usize = 50_000;
/// Most globals a module may have.
pub const MAX_GLOBALS: usize = 1_000;
/// Most exported canister methods (`canister_update/query/composite_query <name>`).
pub const MAX_METHODS: usize = 1_000;
/// Most bytes of exported method names, summed.
pub const MAX_METHOD_NAME_BYTES: usize = 20_000;
/// Most `icp:` custom sections.
pub const MAX_ICP_CUSTOM_SECTIONS: usize = 16;
/// Most bytes of `icp:` custom-section names and contents, summed.
pub const MAX_ICP_CUSTOM_SECTION_BYTES: usize = 1024 * 1024;
/// Largest wasm32 heap (the whole 32-bit address space).
pub const MAX_WASM32_MEMORY_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Size of a wasm page.
pub const WASM_PAGE_BYTES: u64 = 64 * 1024;
/// Most elements a table may grow to.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Instructions allowed for applying a module's data segments at install.
pub const DATA_SEGMENT_INSTRUCTION_LIMIT: u64 = 300_000_000_000;

/// The wasm features a canister module may use: wasm 2.0 (without GC types: no `externref`
/// beyond what reference types need), memory64 and extended constant expressions. See
/// Note [deterministic engine].
pub fn allowed_wasm_features() -> WasmFeatures {
    (WasmFeatures::WASM2 | WasmFeatures::MEMORY64 | WasmFeatures::EXTENDED_CONST)
        .difference(WasmFeatures::GC_TYPES)
}

/// How the embedder is set up. One per process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbedderConfig {
    /// How many compiled modules to keep, by module hash (least recently used are evicted).
    pub compiled_module_cache_entries: usize,
    /// Maximum native stack a wasm execution may use, in bytes. Executions must run on threads
    /// whose stack is larger than this (the default 2 MiB of Rust and tokio threads is).
    pub max_wasm_stack_bytes: usize,
    /// Largest module accepted (plain, or after decompression).
    pub max_module_bytes: usize,
    /// Most bytes `debug_print` may record per execution (the rest is dropped).
    pub max_debug_print_bytes_per_execution: usize,
    /// Most bytes of memory files holding the images of large heaps (Note [tracked heaps] in
    /// `heap_image`); the least recently used go first. A heap that does not fit still runs, with
    /// its stored pages copied in.
    pub max_heap_image_bytes: usize,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        EmbedderConfig {
            compiled_module_cache_entries: 100,
            max_wasm_stack_bytes: 1024 * 1024,
            max_module_bytes: MAX_MODULE_BYTES,
            max_debug_print_bytes_per_execution: 64 * 1024,
            max_heap_image_bytes: 8 << 30,
        }
    }
}

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EmbedderError {
    /// wasmtime refused the configuration (for example on an unsupported CPU).
    #[error(
        "could not configure the wasmtime engine: {0}; check that this CPU and OS are supported by wasmtime"
    )]
    Engine(String),
    /// The ic0 imports could not be registered (a bug in the import table).
    #[error("could not register the ic0 System API with wasmtime: {0}")]
    Linker(String),
    /// The configuration is unusable.
    #[error("invalid embedder configuration: {0}")]
    Config(String),
}

/// Builds the process-wide deterministic engine. See Note [deterministic engine].
pub fn build_engine(config: &EmbedderConfig) -> Result<Engine, EmbedderError> {
    build_engine_with(config, RecyclingMemoryCreator::new())
}

/// [`build_engine`] with the given memory creator (the embedder keeps a handle to its pool).
pub(crate) fn build_engine_with(
    config: &EmbedderConfig,
    memories: RecyclingMemoryCreator,
) -> Result<Engine, EmbedderError> {
    if config.compiled_module_cache_entries == 0 {
        return Err(EmbedderError::Config(
            "compiled_module_cache_entries must be at least 1".to_string(),
        ));
    }
    if config.max_wasm_stack_bytes < 64 * 1024 {
        return Err(EmbedderError::Config(
            "max_wasm_stack_bytes must be at least 64 KiB".to_string(),
        ));
    }
    if config.max_wasm_stack_bytes > crate::sliced::WORKER_STACK_BYTES / 2 {
        return Err(EmbedderError::Config(format!(
            "max_wasm_stack_bytes must be at most {} (half an execution thread's stack)",
            crate::sliced::WORKER_STACK_BYTES / 2
        )));
    }
    let mut wasm = Config::new();
    wasm.wasm_features(WasmFeatures::all(), false)
        .wasm_features(allowed_wasm_features(), true)
        .wasm_relaxed_simd(false)
        .relaxed_simd_deterministic(true)
        .wasm_multi_memory(false)
        .wasm_memory64(true)
        .wasm_tail_call(false)
        .cranelift_nan_canonicalization(true)
        .consume_fuel(true)
        // Epoch checks let a sliced execution notice where it is (Note [sliced executions] in
        // `sliced`); they never change what an execution computes.
        .epoch_interruption(true)
        .wasm_backtrace_max_frames(None)
        .max_wasm_stack(config.max_wasm_stack_bytes)
        // Linear memories come from a pool of recycled reservations instead of a fresh mapping
        // per execution: see Note [recycled linear memories] in `memory_pool`.
        .with_host_memory(Arc::new(memories));
    Engine::new(&wasm).map_err(|e| EmbedderError::Engine(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_engine_builds() {
        build_engine(&EmbedderConfig::default()).expect("engine");
    }

    #[test]
    fn zero_cache_is_refused() {
        let config = EmbedderConfig {
            compiled_module_cache_entries: 0,
            ..EmbedderConfig::default()
        };
        assert!(matches!(
            build_engine(&config),
            Err(EmbedderError::Config(_))
        ));
    }
}
