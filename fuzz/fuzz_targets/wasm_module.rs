//! Arbitrary bytes as a canister module: `prepare_module` (gzip detection, validation against the
//! IC's rules, instrumentation, compilation) and, when it accepts the module,
//! `initial_execution_state` (instantiation and data segments). Both must answer `Ok` or
//! `InvalidWasm`, never panic. Seed the corpus with `fuzz/seeds/wasm_module` (see README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use openic_embedders::{Embedder as _, EmbedderConfig, WasmtimeEmbedder};
use std::sync::{Arc, OnceLock};

fn embedder() -> &'static WasmtimeEmbedder {
    static EMBEDDER: OnceLock<WasmtimeEmbedder> = OnceLock::new();
    EMBEDDER.get_or_init(|| {
        WasmtimeEmbedder::new(EmbedderConfig::default()).expect("the engine builds on this host")
    })
}

/// `OPENIC_FUZZ_VERBOSE=1` prints each outcome (to check that seeds get past validation).
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("OPENIC_FUZZ_VERBOSE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let embedder = embedder();
    let prepared = embedder.prepare_module(data);
    if verbose() {
        eprintln!(
            "prepare_module: {:?}",
            prepared.as_ref().map(|(_, info)| info)
        );
    }
    let Ok((binary, info)) = prepared else {
        return;
    };
    let state = embedder.initial_execution_state(Arc::new(binary), Arc::new(info));
    if verbose() {
        eprintln!(
            "initial_execution_state: {:?}",
            state.as_ref().map(|s| s.globals.len())
        );
    }
});
