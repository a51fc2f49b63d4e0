//! The wasmtime embedder: deterministic configuration, module validation and instrumentation, and the ic0 System API.
