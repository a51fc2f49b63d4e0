//! Writes the `large` canister's embedded data to `$OUT_DIR/large_data.bin`.

#[allow(dead_code)]
mod pseudo_random {
    include!("pseudo_random.rs");
}

fn main() {
    println!("cargo::rerun-if-changed=pseudo_random.rs");
    let out_dir = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    let path = std::path::Path::new(&out_dir).join("large_data.bin");
    let data = pseudo_random::large_data(pseudo_random::LARGE_DATA_BYTES);
    std::fs::write(&path, data)
        .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
}
