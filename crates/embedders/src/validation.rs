//! Module decoding and validation against the IC's module rules (digest §5.1), producing the
//! [`ModuleInfo`] the execution crate needs (methods, system hooks, metadata).

use crate::api::InvalidWasm;
use crate::config::{
    MAX_CODE_SECTION_BYTES, MAX_FUNCTIONS, MAX_GLOBALS, MAX_ICP_CUSTOM_SECTION_BYTES,
    MAX_ICP_CUSTOM_SECTIONS, MAX_METHOD_NAME_BYTES, MAX_METHODS, allowed_wasm_features,
};
use crate::imports::{Ty, lookup};
use openic_replicated_state::{MethodKind, ModuleInfo};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;
use wasmparser::{ExternalKind, Parser, Payload, TypeRef, ValType, Validator};

/// The gzip magic bytes (with the deflate method byte).
const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];

/// Prefix of the exports the instrumentation adds; canister modules may not use it.
pub(crate) const RESERVED_EXPORT_PREFIX: &str = "__openic_";

/// The system entry points a module may export.
pub(crate) const SYSTEM_METHODS: [&str; 7] = [
    "canister_init",
    "canister_pre_upgrade",
    "canister_post_upgrade",
    "canister_inspect_message",
    "canister_heartbeat",
    "canister_global_timer",
    "canister_on_low_wasm_memory",
];

/// Returns the plain wasm: `bytes` itself, or its gzip decompression (at most `max_bytes`).
pub(crate) fn decode(bytes: &[u8], max_bytes: usize) -> Result<Cow<'_, [u8]>, InvalidWasm> {
    if bytes.len() > max_bytes {
        return Err(InvalidWasm::Decode(format!(
            "the module is {} bytes, more than the limit of {max_bytes} bytes",
            bytes.len()
        )));
    }
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut decoder = flate2::read::GzDecoder::new(bytes).take(max_bytes as u64 + 1);
    let mut plain = Vec::new();
    decoder.read_to_end(&mut plain).map_err(|e| {
        InvalidWasm::Decode(format!(
            "the gzip-compressed module does not decompress: {e}"
        ))
    })?;
    if plain.len() > max_bytes {
        return Err(InvalidWasm::Decode(format!(
            "the module decompresses to more than the limit of {max_bytes} bytes"
        )));
    }
    Ok(Cow::Owned(plain))
}

fn invalid(message: impl Into<String>) -> InvalidWasm {
    InvalidWasm::Validation(message.into())
}

fn ty_matches(expected: Ty, actual: ValType, is_wasm64: bool) -> bool {
    match expected {
        Ty::I32 => actual == ValType::I32,
        Ty::I64 => actual == ValType::I64,
        Ty::Addr if is_wasm64 => actual == ValType::I64,
        Ty::Addr => actual == ValType::I32,
    }
}

fn describe_signature(params: &[ValType], results: &[ValType]) -> String {
    let list = |types: &[ValType]| {
        types
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("({}) -> ({})", list(params), list(results))
}

/// Validates a plain wasm module against the wasm spec (with the allowed features) and the IC's
/// module rules, and returns what was learned about it.
pub(crate) fn validate(wasm: &[u8]) -> Result<ModuleInfo, InvalidWasm> {
    if !wasm.starts_with(b"\0asm") {
        return Err(InvalidWasm::Decode(
            "the module starts neither with the wasm magic `\\0asm` nor with the gzip magic"
                .to_string(),
        ));
    }
    let types = Validator::new_with_features(allowed_wasm_features())
        .validate_all(wasm)
        .map_err(|e| invalid(format!("not valid wasm: {e}")))?;
    let types = types.as_ref();

    if types.memory_count() > 1 {
        return Err(invalid(format!(
            "the module declares {} memories; at most one is allowed",
            types.memory_count()
        )));
    }
    let is_wasm64 = types.memory_count() == 1 && types.memory_at(0).memory64;
    if types.function_count() as usize > MAX_FUNCTIONS {
        return Err(invalid(format!(
            "the module has {} functions, more than the limit of {MAX_FUNCTIONS}",
            types.function_count()
        )));
    }
    if types.global_count() as usize > MAX_GLOBALS {
        return Err(invalid(format!(
            "the module has {} globals, more than the limit of {MAX_GLOBALS}",
            types.global_count()
        )));
    }
    for index in 0..types.global_count() {
        let global = types.global_at(index);
        if global.mutable
            && !matches!(
                global.content_type,
                ValType::I32 | ValType::I64 | ValType::F32 | ValType::F64 | ValType::V128
            )
        {
            return Err(invalid(format!(
                "global {index} is a mutable global of reference type {}; canister globals must be numeric to persist between messages",
                global.content_type
            )));
        }
    }
    let func_type = |index: u32| types[types.core_function_at(index)].unwrap_func().clone();

    let mut info = ModuleInfo {
        is_wasm64,
        ..ModuleInfo::default()
    };
    let mut method_name_bytes = 0usize;
    let mut icp_sections = 0usize;
    let mut icp_section_bytes = 0usize;
    let mut seen_exports: BTreeMap<String, ()> = BTreeMap::new();

    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| invalid(format!("not valid wasm: {e}")))?;
        match payload {
            Payload::ImportSection(reader) => {
                for (function_index, import) in reader.into_imports().enumerate() {
                    let function_index = function_index as u32;
                    let import = import.map_err(|e| invalid(format!("bad import: {e}")))?;
                    if import.module != "ic0" {
                        return Err(invalid(format!(
                            "the module imports `{}.{}`; imports may only come from module `ic0`",
                            import.module, import.name
                        )));
                    }
                    let TypeRef::Func(_) = import.ty else {
                        return Err(invalid(format!(
                            "the module imports `ic0.{}` as a non-function; only ic0 functions may be imported",
                            import.name
                        )));
                    };
                    let Some(expected) = lookup(import.name) else {
                        return Err(invalid(format!(
                            "the module imports `ic0.{}`, which is not a System API function",
                            import.name
                        )));
                    };
                    if expected.wasm32_only && is_wasm64 {
                        return Err(invalid(format!(
                            "`ic0.{}` exists only for 32-bit modules; use its 64-bit or 128-bit counterpart in a memory64 module",
                            import.name
                        )));
                    }
                    let actual = func_type(function_index);
                    let matches = actual.params().len() == expected.params.len()
                        && actual.results().len() == expected.results.len()
                        && actual
                            .params()
                            .iter()
                            .zip(expected.params)
                            .all(|(a, e)| ty_matches(*e, *a, is_wasm64))
                        && actual
                            .results()
                            .iter()
                            .zip(expected.results)
                            .all(|(a, e)| ty_matches(*e, *a, is_wasm64));
                    if !matches {
                        return Err(invalid(format!(
                            "`ic0.{}` is imported with type {}, which is not its System API signature",
                            import.name,
                            describe_signature(actual.params(), actual.results())
                        )));
                    }
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(|e| invalid(format!("bad export: {e}")))?;
                    let name = export.name;
                    if name.starts_with(RESERVED_EXPORT_PREFIX) {
                        return Err(invalid(format!(
                            "export `{name}` uses the prefix `{RESERVED_EXPORT_PREFIX}`, which is reserved"
                        )));
                    }
                    if !name.starts_with("canister_") {
                        continue;
                    }
                    let (kind, method) = match name.split_once(' ') {
                        Some(("canister_update", method)) => (Some(MethodKind::Update), method),
                        Some(("canister_query", method)) => (Some(MethodKind::Query), method),
                        Some(("canister_composite_query", method)) => {
                            (Some(MethodKind::CompositeQuery), method)
                        }
                        None if SYSTEM_METHODS.contains(&name) => (None, name),
                        _ => {
                            return Err(invalid(format!(
                                "export `{name}` starts with `canister_` but is neither a system entry point nor `canister_update`/`canister_query`/`canister_composite_query` followed by one space and a name"
                            )));
                        }
                    };
                    if !matches!(export.kind, ExternalKind::Func) {
                        return Err(invalid(format!("export `{name}` must be a function")));
                    }
                    let ty = func_type(export.index);
                    if !ty.params().is_empty() || !ty.results().is_empty() {
                        return Err(invalid(format!(
                            "export `{name}` has type {}; canister entry points must have type () -> ()",
                            describe_signature(ty.params(), ty.results())
                        )));
                    }
                    match kind {
                        None => {
                            info.system_methods.insert(name.to_string());
                        }
                        Some(kind) => {
                            if seen_exports.insert(method.to_string(), ()).is_some() {
                                return Err(invalid(format!(
                                    "method `{method}` is exported more than once (as two of update, query or composite query)"
                                )));
                            }
                            method_name_bytes += method.len();
                            info.methods.insert(method.to_string(), kind);
                        }
                    }
                }
            }
            Payload::CodeSectionStart { size, .. } if size as usize > MAX_CODE_SECTION_BYTES => {
                return Err(invalid(format!(
                    "the code section is {size} bytes, more than the limit of {MAX_CODE_SECTION_BYTES}"
                )));
            }
            Payload::CustomSection(reader) => {
                let name = reader.name();
                let Some(rest) = name.strip_prefix("icp:") else {
                    continue;
                };
                let (visibility, metadata_name) = match rest.split_once(' ') {
                    Some(("public", n)) => (true, n),
                    Some(("private", n)) => (false, n),
                    _ => {
                        return Err(invalid(format!(
                            "custom section `{name}` starts with `icp:` but is neither `icp:public <name>` nor `icp:private <name>`"
                        )));
                    }
                };
                icp_sections += 1;
                icp_section_bytes += name.len() + reader.data().len();
                let duplicate = info.public_metadata.contains_key(metadata_name)
                    || info.private_metadata.contains_key(metadata_name);
                if duplicate {
                    return Err(invalid(format!(
                        "custom section `icp:* {metadata_name}` appears more than once"
                    )));
                }
                let target = if visibility {
                    &mut info.public_metadata
                } else {
                    &mut info.private_metadata
                };
                target.insert(metadata_name.to_string(), reader.data().to_vec());
            }
            _ => {}
        }
    }
    if info.methods.len() > MAX_METHODS {
        return Err(invalid(format!(
            "the module exports {} methods, more than the limit of {MAX_METHODS}",
            info.methods.len()
        )));
    }
    if method_name_bytes > MAX_METHOD_NAME_BYTES {
        return Err(invalid(format!(
            "the exported method names total {method_name_bytes} bytes, more than the limit of {MAX_METHOD_NAME_BYTES}"
        )));
    }
    if icp_sections > MAX_ICP_CUSTOM_SECTIONS {
        return Err(invalid(format!(
            "the module has {icp_sections} `icp:` custom sections, more than the limit of {MAX_ICP_CUSTOM_SECTIONS}"
        )));
    }
    if icp_section_bytes > MAX_ICP_CUSTOM_SECTION_BYTES {
        return Err(invalid(format!(
            "the `icp:` custom sections total {icp_section_bytes} bytes, more than the limit of {MAX_ICP_CUSTOM_SECTION_BYTES}"
        )));
    }
    info.custom_sections_size = icp_section_bytes as u64;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm(text: &str) -> Vec<u8> {
        wat::parse_str(text).expect("wat")
    }

    #[test]
    fn accepts_a_canister_and_collects_methods_and_metadata() {
        let mut bytes = wasm(
            r#"(module
                (import "ic0" "msg_reply" (func))
                (memory 1)
                (func $f)
                (export "canister_update inc" (func $f))
                (export "canister_query get value" (func $f))
                (export "canister_init" (func $f))
                (export "memory" (memory 0)))"#,
        );
        // A custom section `icp:public candid:service` with contents "abc".
        let name = b"icp:public candid:service";
        let mut section = vec![name.len() as u8];
        section.extend_from_slice(name);
        section.extend_from_slice(b"abc");
        bytes.push(0);
        bytes.push(section.len() as u8);
        bytes.extend_from_slice(&section);
        let info = validate(&bytes).expect("valid");
        assert_eq!(info.methods.get("inc"), Some(&MethodKind::Update));
        assert_eq!(info.methods.get("get value"), Some(&MethodKind::Query));
        assert!(info.system_methods.contains("canister_init"));
        assert_eq!(
            info.public_metadata
                .get("candid:service")
                .map(Vec::as_slice),
            Some(&b"abc"[..])
        );
        assert!(!info.is_wasm64);
    }

    #[test]
    fn rejects_unknown_import_and_wrong_signature() {
        let err = validate(&wasm(r#"(module (import "env" "f" (func)))"#)).unwrap_err();
        assert!(
            err.to_string().contains("only come from module `ic0`"),
            "{err}"
        );
        let err = validate(&wasm(r#"(module (import "ic0" "nope" (func)))"#)).unwrap_err();
        assert!(
            err.to_string().contains("not a System API function"),
            "{err}"
        );
        let err = validate(&wasm(
            r#"(module (import "ic0" "msg_reply_data_append" (func (param i32 i32))) (memory i64 1))"#,
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("not its System API signature"),
            "{err}"
        );
        validate(&wasm(
            r#"(module (import "ic0" "msg_reply_data_append" (func (param i64 i64))) (memory i64 1))"#,
        ))
        .expect("memory64 uses i64 addresses");
        let err = validate(&wasm(
            r#"(module (import "ic0" "stable_size" (func (result i32))) (memory i64 1))"#,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("only for 32-bit"), "{err}");
    }

    #[test]
    fn rejects_bad_exports() {
        for (text, needle) in [
            (
                r#"(module (func $f) (export "canister_foo" (func $f)))"#,
                "starts with `canister_`",
            ),
            (
                r#"(module (func $f) (export "canister_update a" (func $f)) (export "canister_query a" (func $f)))"#,
                "more than once",
            ),
            (
                r#"(module (func $f (param i32)) (export "canister_update a" (func $f)))"#,
                "() -> ()",
            ),
            (
                r#"(module (func $f) (export "__openic_x" (func $f)))"#,
                "reserved",
            ),
        ] {
            let err = validate(&wasm(text)).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn rejects_two_memories() {
        // Multi-memory is not an allowed feature, so the wasm validator refuses it first.
        let err = validate(&wasm(r#"(module (memory 1) (memory 1))"#)).unwrap_err();
        assert!(matches!(err, InvalidWasm::Validation(_)), "{err}");
    }

    #[test]
    fn gzip_is_decoded_and_bounded() {
        use std::io::Write;
        let plain = wasm("(module)");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&plain).unwrap();
        let gz = encoder.finish().unwrap();
        assert_eq!(decode(&gz, 1000).unwrap().as_ref(), plain.as_slice());
        assert!(decode(&gz, 4).is_err());
        let bomb = {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            encoder.write_all(&vec![0u8; 100_000]).unwrap();
            encoder.finish().unwrap()
        };
        assert!(decode(&bomb, 10_000).is_err());
        assert!(validate(b"not wasm").is_err());
    }
}
