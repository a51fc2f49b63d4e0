//! Rewrites a validated module so that its state can live outside any wasmtime instance.
//!
//! Note [instance-free state]: every execution gets a fresh instance, so whatever the module keeps
//! in memory and globals must be copied in before and out after. The rewrite
//! - exports memory 0, table 0 and every mutable global under reserved names, so they can be
//!   restored and read back;
//! - removes the `(start)` section and exports the start function instead, because it runs once at
//!   install (`EntryPoint::StartOnly`), not at every instantiation;
//! - turns active data segments into passive ones applied by an exported function, because the
//!   heap image in the state replaces them after install (an instantiation must not write the
//!   original data over pages the canister changed or zeroed). The only observable difference: a
//!   `memory.init` naming a formerly active segment would not trap; compilers never emit one.
//! - drops custom sections, which the compiled code does not need;
//! - adds a slice probe at every loop header (see Note [slice probes]).
//!
//! Note [slice probes]: a sliced execution learns where it is at wasmtime's epoch checks, but in a
//! loop that calls no function wasmtime keeps the fuel count in a register and the store's count
//! stays stale until the loop ends, so the worker could not tell that it ran past its grant (Note
//! [sliced executions] in `sliced`). So every loop header gets
//! `global.get $probe; if; call $save; else; (i32.const 0; drop) x2; end`, where `$probe` is an
//! added global the epoch callback sets, and `$save` an added empty function: calling it makes
//! wasmtime store the exact count, and the epoch check at its entry calls back with it. Both
//! branches cost the same fuel (4: the call and the return from `$save` cost 2, as two constants
//! do; a test checks it), so the instruction count never depends on when the epoch ticked;
//! `$probe` is not a persisted global, so its value never reaches the state.

use crate::api::InvalidWasm;
use wasm_encoder::Encode;
use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{
    CodeSection, ConstExpr, DataCountSection, DataSection, ExportKind, ExportSection, Function,
    FunctionSection, GlobalSection, GlobalType, Instruction, RawSection, TypeSection,
};
use wasmparser::{DataKind, Operator, Parser, Payload, ValType};

/// Export name of memory 0.
pub(crate) const MEMORY_EXPORT: &str = "__openic_memory";
/// Export name of table 0.
pub(crate) const TABLE_EXPORT: &str = "__openic_table";
/// Export name of the former `(start)` function.
pub(crate) const START_EXPORT: &str = "__openic_start";
/// Export name of the function that applies the data segments.
pub(crate) const INIT_DATA_EXPORT: &str = "__openic_init_data";
/// Export name of the slice probe global (Note [slice probes]).
pub(crate) const PROBE_EXPORT: &str = "__openic_probe";

/// Export name of mutable global `index`.
pub(crate) fn global_export(index: u32) -> String {
    format!("__openic_global_{index}")
}

/// The rewritten module and what the embedder needs to know to drive it.
#[derive(Debug)]
pub(crate) struct Instrumented {
    /// The rewritten module.
    pub bytes: Vec<u8>,
    /// Indices and types of the mutable globals, in definition order (the persisted globals).
    pub mutable_globals: Vec<(u32, ValType)>,
    /// Whether the module has a memory.
    pub has_memory: bool,
    /// Whether the module has a table.
    pub has_table: bool,
    /// Whether the module had a `(start)` function.
    pub has_start: bool,
}

fn error(e: impl std::fmt::Display) -> InvalidWasm {
    InvalidWasm::Validation(format!("the module could not be rewritten: {e}"))
}

/// Facts gathered in a first pass.
#[derive(Default)]
struct Facts {
    type_count: u32,
    imported_functions: u32,
    imported_globals: u32,
    defined_globals: u32,
    defined_functions: u32,
    data_segments: u32,
    has_data_count: bool,
    start: Option<u32>,
    mutable_globals: Vec<(u32, ValType)>,
    has_memory: bool,
    has_table: bool,
}

fn gather(wasm: &[u8]) -> Result<Facts, InvalidWasm> {
    let mut facts = Facts::default();
    let mut global_index = 0u32;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(error)? {
            Payload::TypeSection(reader) => {
                for group in reader {
                    facts.type_count += group.map_err(error)?.types().len() as u32;
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    match import.map_err(error)?.ty {
                        wasmparser::TypeRef::Func(_) => facts.imported_functions += 1,
                        wasmparser::TypeRef::Global(_) => facts.imported_globals += 1,
                        _ => {}
                    }
                }
            }
            Payload::FunctionSection(reader) => facts.defined_functions = reader.count(),
            Payload::TableSection(reader) => facts.has_table |= reader.count() > 0,
            Payload::MemorySection(reader) => facts.has_memory |= reader.count() > 0,
            Payload::GlobalSection(reader) => {
                for global in reader {
                    let global = global.map_err(error)?;
                    if global.ty.mutable {
                        facts
                            .mutable_globals
                            .push((global_index, global.ty.content_type));
                    }
                    global_index += 1;
                }
                facts.defined_globals = global_index;
            }
            Payload::StartSection { func, .. } => facts.start = Some(func),
            Payload::DataCountSection { .. } => facts.has_data_count = true,
            Payload::DataSection(reader) => facts.data_segments = reader.count(),
            _ => {}
        }
    }
    Ok(facts)
}

/// Section ids of the binary format.
mod id {
    pub const TYPE: u8 = 1;
    pub const FUNCTION: u8 = 3;
    pub const GLOBAL: u8 = 6;
    pub const EXPORT: u8 = 7;
    pub const CODE: u8 = 10;
    pub const DATA: u8 = 11;
    pub const DATA_COUNT: u8 = 12;
}

/// Position of a section id in the required section order.
fn rank(section_id: u8) -> u8 {
    match section_id {
        1 => 1,   // type
        2 => 2,   // import
        3 => 3,   // function
        4 => 4,   // table
        5 => 5,   // memory
        13 => 6,  // tag
        6 => 7,   // global
        7 => 8,   // export
        8 => 9,   // start
        9 => 10,  // element
        12 => 11, // data count
        10 => 12, // code
        11 => 13, // data
        _ => 0,
    }
}

struct Writer<'a> {
    wasm: &'a [u8],
    facts: &'a Facts,
    module: wasm_encoder::Module,
    init_body: Function,
    emitted: Vec<u8>,
}

impl Writer<'_> {
    fn init_type_index(&self) -> u32 {
        self.facts.type_count
    }

    fn init_function_index(&self) -> u32 {
        self.facts.imported_functions + self.facts.defined_functions
    }

    /// The added empty function the slice probes call.
    fn save_function_index(&self) -> u32 {
        self.init_function_index() + 1
    }

    /// The added slice probe global.
    fn probe_global_index(&self) -> u32 {
        self.facts.imported_globals + self.facts.defined_globals
    }

    /// The added functions' entries of the function section.
    fn add_functions(&self, functions: &mut FunctionSection) {
        functions.function(self.init_type_index());
        functions.function(self.init_type_index());
    }

    /// The added functions' bodies.
    fn add_bodies(&self, code: &mut CodeSection) {
        code.function(&self.init_body);
        let mut save = Function::new([]);
        save.instruction(&Instruction::End);
        code.function(&save);
    }

    /// The probe global: a mutable `i32`, 0.
    fn add_globals(globals: &mut GlobalSection) {
        globals.global(
            GlobalType {
                val_type: wasm_encoder::ValType::I32,
                mutable: true,
                shared: false,
            },
            &ConstExpr::i32_const(0),
        );
    }

    /// A function body with a slice probe after every `loop` (Note [slice probes]).
    fn probed_body(&self, body: &wasmparser::FunctionBody<'_>) -> Result<Vec<u8>, InvalidWasm> {
        let range = body.range();
        let bytes = &self.wasm[range.clone()];
        let mut probe = Vec::new();
        // In the else branch, two constants cost what the call and the return from `$save` do.
        for instruction in [
            Instruction::GlobalGet(self.probe_global_index()),
            Instruction::If(wasm_encoder::BlockType::Empty),
            Instruction::Call(self.save_function_index()),
            Instruction::Else,
            Instruction::I32Const(0),
            Instruction::Drop,
            Instruction::I32Const(0),
            Instruction::Drop,
            Instruction::End,
        ] {
            instruction.encode(&mut probe);
        }
        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 8);
        let mut copied = range.start;
        let mut reader = body.get_operators_reader().map_err(error)?;
        while !reader.eof() {
            let op = reader.read().map_err(error)?;
            if matches!(op, Operator::Loop { .. }) {
                let after = reader.original_position();
                out.extend_from_slice(&self.wasm[copied..after]);
                out.extend_from_slice(&probe);
                copied = after;
            }
        }
        out.extend_from_slice(&self.wasm[copied..range.end]);
        Ok(out)
    }

    /// Emits the synthetic sections that must come before a section of rank `before` and that
    /// the original module lacks.
    fn emit_missing(&mut self, before: u8) {
        for section in [
            id::TYPE,
            id::FUNCTION,
            id::GLOBAL,
            id::EXPORT,
            id::DATA_COUNT,
            id::CODE,
        ] {
            if rank(section) >= before || self.emitted.contains(&section) {
                continue;
            }
            match section {
                id::TYPE => {
                    let mut types = TypeSection::new();
                    types.ty().function([], []);
                    self.module.section(&types);
                }
                id::FUNCTION => {
                    let mut functions = FunctionSection::new();
                    self.add_functions(&mut functions);
                    self.module.section(&functions);
                }
                id::GLOBAL => {
                    let mut globals = GlobalSection::new();
                    Self::add_globals(&mut globals);
                    self.module.section(&globals);
                }
                id::EXPORT => {
                    let mut exports = ExportSection::new();
                    self.add_exports(&mut exports);
                    self.module.section(&exports);
                }
                id::DATA_COUNT => {
                    if self.facts.data_segments > 0 {
                        self.module.section(&DataCountSection {
                            count: self.facts.data_segments,
                        });
                    }
                }
                _ => {
                    let mut code = CodeSection::new();
                    self.add_bodies(&mut code);
                    self.module.section(&code);
                }
            }
            self.emitted.push(section);
        }
    }

    fn add_exports(&self, exports: &mut ExportSection) {
        if self.facts.has_memory {
            exports.export(MEMORY_EXPORT, ExportKind::Memory, 0);
        }
        if self.facts.has_table {
            exports.export(TABLE_EXPORT, ExportKind::Table, 0);
        }
        if let Some(start) = self.facts.start {
            exports.export(START_EXPORT, ExportKind::Func, start);
        }
        exports.export(
            INIT_DATA_EXPORT,
            ExportKind::Func,
            self.init_function_index(),
        );
        for (index, _) in &self.facts.mutable_globals {
            exports.export(&global_export(*index), ExportKind::Global, *index);
        }
        exports.export(PROBE_EXPORT, ExportKind::Global, self.probe_global_index());
    }
}

/// Builds the body of the data-initialisation function from the data section.
fn init_data_body(wasm: &[u8]) -> Result<Function, InvalidWasm> {
    let mut body = Function::new([]);
    for payload in Parser::new(0).parse_all(wasm) {
        let Payload::DataSection(reader) = payload.map_err(error)? else {
            continue;
        };
        for (segment, data) in reader.into_iter().enumerate() {
            let data = data.map_err(error)?;
            let DataKind::Active {
                memory_index,
                offset_expr,
            } = data.kind
            else {
                continue;
            };
            let mut operators = offset_expr.get_operators_reader();
            while !operators.eof() {
                let op = operators.read().map_err(error)?;
                if matches!(op, Operator::End) {
                    continue;
                }
                let instruction = RoundtripReencoder.instruction(op).map_err(error)?;
                body.instruction(&instruction);
            }
            let segment = segment as u32;
            body.instruction(&Instruction::I32Const(0));
            body.instruction(&Instruction::I32Const(data.data.len() as i32));
            body.instruction(&Instruction::MemoryInit {
                mem: memory_index,
                data_index: segment,
            });
            body.instruction(&Instruction::DataDrop(segment));
        }
    }
    body.instruction(&Instruction::End);
    Ok(body)
}

/// Rewrites a validated module (see Note [instance-free state]).
pub(crate) fn instrument(wasm: &[u8]) -> Result<Instrumented, InvalidWasm> {
    let facts = gather(wasm)?;
    let init_body = init_data_body(wasm)?;
    let mut writer = Writer {
        wasm,
        facts: &facts,
        module: wasm_encoder::Module::new(),
        init_body,
        emitted: Vec::new(),
    };
    let mut code: Option<CodeSection> = None;
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(error)?;
        if let Payload::CodeSectionEntry(body) = &payload {
            let probed = writer.probed_body(body)?;
            if let Some(code) = code.as_mut() {
                code.raw(&probed);
            }
            continue;
        }
        if let Some(mut finished) = code.take() {
            writer.add_bodies(&mut finished);
            writer.module.section(&finished);
            writer.emitted.push(id::CODE);
        }
        let Some((section_id, range)) = payload.as_section() else {
            continue;
        };
        if section_id == 0 {
            continue; // Custom sections are dropped.
        }
        writer.emit_missing(rank(section_id));
        match payload {
            Payload::TypeSection(reader) => {
                let mut types = TypeSection::new();
                RoundtripReencoder
                    .parse_type_section(&mut types, reader)
                    .map_err(error)?;
                types.ty().function([], []);
                writer.module.section(&types);
                writer.emitted.push(id::TYPE);
            }
            Payload::FunctionSection(reader) => {
                let mut functions = FunctionSection::new();
                RoundtripReencoder
                    .parse_function_section(&mut functions, reader)
                    .map_err(error)?;
                writer.add_functions(&mut functions);
                writer.module.section(&functions);
                writer.emitted.push(id::FUNCTION);
            }
            Payload::GlobalSection(reader) => {
                let mut globals = GlobalSection::new();
                RoundtripReencoder
                    .parse_global_section(&mut globals, reader)
                    .map_err(error)?;
                Writer::add_globals(&mut globals);
                writer.module.section(&globals);
                writer.emitted.push(id::GLOBAL);
            }
            Payload::ExportSection(reader) => {
                let mut exports = ExportSection::new();
                RoundtripReencoder
                    .parse_export_section(&mut exports, reader)
                    .map_err(error)?;
                writer.add_exports(&mut exports);
                writer.module.section(&exports);
                writer.emitted.push(id::EXPORT);
            }
            Payload::StartSection { .. } => {}
            Payload::DataCountSection { .. } => {
                writer.module.section(&RawSection {
                    id: id::DATA_COUNT,
                    data: &wasm[range],
                });
                writer.emitted.push(id::DATA_COUNT);
            }
            Payload::CodeSectionStart { .. } => code = Some(CodeSection::new()),
            Payload::DataSection(reader) => {
                let mut data = DataSection::new();
                for segment in reader {
                    data.passive(segment.map_err(error)?.data.iter().copied());
                }
                writer.module.section(&data);
                writer.emitted.push(id::DATA);
            }
            _ => {
                writer.module.section(&RawSection {
                    id: section_id,
                    data: &wasm[range],
                });
            }
        }
    }
    if let Some(mut finished) = code.take() {
        writer.add_bodies(&mut finished);
        writer.module.section(&finished);
        writer.emitted.push(id::CODE);
    }
    writer.emit_missing(u8::MAX);
    Ok(Instrumented {
        bytes: writer.module.finish(),
        mutable_globals: facts.mutable_globals.clone(),
        has_memory: facts.has_memory,
        has_table: facts.has_table,
        has_start: facts.start.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports_of(bytes: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        for payload in Parser::new(0).parse_all(bytes) {
            if let Payload::ExportSection(reader) = payload.unwrap() {
                for export in reader {
                    names.push(export.unwrap().name.to_string());
                }
            }
        }
        names
    }

    #[test]
    fn rewritten_module_is_valid_and_exports_state() {
        let wasm = wat::parse_str(
            r#"(module
                (memory 1)
                (table 1 funcref)
                (global $g (mut i32) (i32.const 7))
                (global $c i64 (i64.const 1))
                (func $start)
                (start $start)
                (data (i32.const 16) "hello")
                (data "passive"))"#,
        )
        .unwrap();
        let out = instrument(&wasm).unwrap();
        wasmparser::Validator::new_with_features(crate::config::allowed_wasm_features())
            .validate_all(&out.bytes)
            .expect("rewritten module validates");
        let names = exports_of(&out.bytes);
        for expected in [
            MEMORY_EXPORT,
            TABLE_EXPORT,
            START_EXPORT,
            INIT_DATA_EXPORT,
            "__openic_global_0",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n == "__openic_global_1"));
        assert_eq!(out.mutable_globals, vec![(0, ValType::I32)]);
        assert!(out.has_start && out.has_memory && out.has_table);
        let has_start_section = Parser::new(0)
            .parse_all(&out.bytes)
            .any(|p| matches!(p, Ok(Payload::StartSection { .. })));
        assert!(!has_start_section);
    }

    #[test]
    fn empty_module_gets_init_function() {
        let out = instrument(&wat::parse_str("(module)").unwrap()).unwrap();
        wasmparser::Validator::new()
            .validate_all(&out.bytes)
            .expect("valid");
        assert_eq!(
            exports_of(&out.bytes),
            vec![INIT_DATA_EXPORT.to_string(), PROBE_EXPORT.to_string()]
        );
    }

    #[test]
    fn a_slice_probe_costs_the_same_fuel_whether_it_fires_or_not() {
        let wasm = wat::parse_str(
            r#"(module
                (global $n (mut i32) (i32.const 0))
                (func $inner (loop $l
                    (global.set $n (i32.add (global.get $n) (i32.const 1)))
                    (br_if $l (i32.lt_u (global.get $n) (i32.const 1000)))))
                (func (export "run") (call $inner)))"#,
        )
        .unwrap();
        let out = instrument(&wasm).unwrap();
        wasmparser::Validator::new_with_features(crate::config::allowed_wasm_features())
            .validate_all(&out.bytes)
            .expect("probed module validates");
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        let engine = wasmtime::Engine::new(&config).unwrap();
        let module = wasmtime::Module::new(&engine, &out.bytes).unwrap();
        let used = |probe: i32| {
            let mut store = wasmtime::Store::new(&engine, ());
            store.set_fuel(1_000_000).unwrap();
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
            instance
                .get_global(&mut store, PROBE_EXPORT)
                .unwrap()
                .set(&mut store, wasmtime::Val::I32(probe))
                .unwrap();
            let run = instance
                .get_typed_func::<(), ()>(&mut store, "run")
                .unwrap();
            run.call(&mut store, ()).unwrap();
            1_000_000 - store.get_fuel().unwrap()
        };
        assert_eq!(used(0), used(1));
    }
}
