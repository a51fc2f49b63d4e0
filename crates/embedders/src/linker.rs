//! Registers the ic0 System API with wasmtime: one [`Linker`] for wasm32 modules (addresses are
//! `i32`) and one for memory64 modules (`i64`), built once per process.
//!
//! Every host function first charges [`SYSTEM_API_CALL_INSTRUCTIONS`], checks the execution
//! context (trapping with a contract violation outside it), runs the semantics in
//! [`SystemApi`], then charges one instruction per byte it copied.

use crate::api::{ExecutionError, MemoryBudget};
use crate::config::{MAX_TABLE_ELEMENTS, WASM_PAGE_BYTES};
use crate::imports::mask;
use crate::system_api::{
    MAX_LEGACY_STABLE_PAGES, SYSTEM_API_CALL_INSTRUCTIONS, SystemApi, amount_128,
};
use openic_replicated_state::WasmClosure;
use openic_types::chain_keys::ChainKeyAlgorithm;
use std::sync::Arc;
use wasmtime::{Caller, Engine, Linker, Memory, ResourceLimiter, WasmTy};

/// Per-store data: the System API state and what the host functions need to reach the heap.
pub(crate) struct StoreData {
    /// `None` while data segments are applied at install: no System API call is possible then.
    pub api: Option<SystemApi>,
    /// The instance's memory, once instantiated.
    pub memory: Option<Memory>,
    /// Memory and table growth limits.
    pub limits: GrowthLimits,
    /// The execution's instruction limit (fuel poured in at the start).
    pub instruction_limit: u64,
}

/// Makes `memory.grow` and `table.grow` fail deterministically at fixed sizes.
pub(crate) struct GrowthLimits {
    /// Largest heap in bytes.
    pub memory_bytes: u64,
    /// `Some(setting)` when `memory_bytes` is the canister's `wasm_memory_limit` where the spec
    /// enforces it: growing past it traps instead of failing.
    pub trap_at_setting: Option<u64>,
    /// The memory a non-replicated execution reserved from the node's budget (Note [memory
    /// budget] in `api`); `None` for replicated executions.
    pub lease: Option<MemoryLease>,
}

/// Stable memory is written in pages of this size: a write dirties every page it overlaps.
const STABLE_PAGE_BYTES: u64 = 4096;

/// What one execution reserved from a [`MemoryBudget`], released when dropped.
#[derive(Debug)]
pub(crate) struct MemoryLease {
    budget: Arc<dyn MemoryBudget>,
    held: u64,
    /// The heap size covered.
    heap: u64,
    /// Stable memory bytes covered (pages written, counted once per write).
    stable: u64,
}

impl MemoryLease {
    pub(crate) fn new(budget: Arc<dyn MemoryBudget>) -> MemoryLease {
        MemoryLease {
            budget,
            held: 0,
            heap: 0,
            stable: 0,
        }
    }

    fn reserve(&mut self, bytes: u64) -> Result<(), ExecutionError> {
        if bytes == 0 {
            return Ok(());
        }
        self.budget
            .reserve(bytes)
            .map_err(ExecutionError::NodeMemoryBusy)?;
        self.held += bytes;
        Ok(())
    }

    /// Covers a heap of `bytes` (the heap only grows within an execution).
    pub(crate) fn cover_heap(&mut self, bytes: u64) -> Result<(), ExecutionError> {
        if bytes > self.heap {
            self.reserve(bytes - self.heap)?;
            self.heap = bytes;
        }
        Ok(())
    }

    /// Covers a write of `size` bytes to a stable memory of `stable_bytes`: the pages it may
    /// dirty, never more than the whole stable memory in total.
    pub(crate) fn cover_stable_write(
        &mut self,
        size: u64,
        stable_bytes: u64,
    ) -> Result<(), ExecutionError> {
        if size == 0 {
            return Ok(());
        }
        // An unaligned write touches one more page than its length fills.
        let pages = size.div_ceil(STABLE_PAGE_BYTES).saturating_add(1);
        let covered = self
            .stable
            .saturating_add(pages.saturating_mul(STABLE_PAGE_BYTES))
            .min(stable_bytes.max(self.stable));
        if covered > self.stable {
            self.reserve(covered - self.stable)?;
            self.stable = covered;
        }
        Ok(())
    }
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        self.budget.release(self.held);
    }
}

impl ResourceLimiter for GrowthLimits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired <= self.memory_bytes {
            if let Some(lease) = &mut self.lease {
                lease.cover_heap(desired).map_err(HostError)?;
            }
            return Ok(true);
        }
        match self.trap_at_setting {
            Some(limit) => Err(HostError(ExecutionError::WasmMemoryLimitExceeded {
                limit,
                peak: desired,
            })
            .into()),
            None => Ok(false),
        }
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A System API error travelling through wasmtime as a trap.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HostError(pub ExecutionError);

/// `i32` or `i64`: the type of addresses and sizes for a module's memory type.
pub(crate) trait Address: WasmTy + Copy + Send + Sync + 'static {
    /// The unsigned value.
    fn to_u64(self) -> u64;
    /// From an unsigned value (truncated for `i32`; the values returned fit).
    fn from_u64(value: u64) -> Self;
}

impl Address for i32 {
    fn to_u64(self) -> u64 {
        self as u32 as u64
    }
    fn from_u64(value: u64) -> Self {
        value as u32 as i32
    }
}

impl Address for i64 {
    fn to_u64(self) -> u64 {
        self as u64
    }
    fn from_u64(value: u64) -> Self {
        value as i64
    }
}

fn host(error: ExecutionError) -> wasmtime::Error {
    wasmtime::Error::new(HostError(error))
}

/// Reserves the stable memory pages a write of `size` bytes may dirty, for an execution under a
/// memory budget (before the write is checked: a write out of bounds traps right after).
fn cover_stable_write(caller: &mut Caller<'_, StoreData>, size: u64) -> wasmtime::Result<()> {
    let data = caller.data_mut();
    let stable_bytes = data
        .api
        .as_ref()
        .map_or(0, |api| api.stable_size().saturating_mul(WASM_PAGE_BYTES));
    if let Some(lease) = &mut data.limits.lease {
        lease.cover_stable_write(size, stable_bytes).map_err(host)?;
    }
    Ok(())
}

/// Runs one System API function: charges, checks the context, runs `body` on the state and heap.
fn api_call<R>(
    caller: &mut Caller<'_, StoreData>,
    function: &'static str,
    allowed: u32,
    body: impl FnOnce(&mut SystemApi, &mut [u8]) -> Result<R, ExecutionError>,
) -> wasmtime::Result<R> {
    let limit = caller.data().instruction_limit;
    let fuel = caller.get_fuel()?;
    if fuel < SYSTEM_API_CALL_INSTRUCTIONS {
        caller.set_fuel(0)?;
        return Err(host(ExecutionError::InstructionLimitExceeded { limit }));
    }
    let fuel = fuel - SYSTEM_API_CALL_INSTRUCTIONS;
    let memory = caller.data().memory;
    let (heap, data): (&mut [u8], &mut StoreData) = match memory {
        Some(memory) => memory.data_and_store_mut(&mut *caller),
        None => (&mut [], caller.data_mut()),
    };
    let Some(api) = data.api.as_mut() else {
        return Err(host(ExecutionError::ContractViolation(format!(
            "\"ic0.{function}\" cannot be called while the module's data segments are applied"
        ))));
    };
    api.check_context(function, allowed).map_err(host)?;
    api.instructions_so_far = limit.saturating_sub(fuel);
    api.extra_instructions = 0;
    let result = body(api, heap);
    let extra = api.extra_instructions;
    if extra > fuel {
        caller.set_fuel(0)?;
        return Err(host(ExecutionError::InstructionLimitExceeded { limit }));
    }
    caller.set_fuel(fuel - extra)?;
    result.map_err(host)
}

type C<'a> = Caller<'a, StoreData>;

/// Builds the linker for modules whose addresses are `A`; `legacy` adds the wasm32-only API.
pub(crate) fn build_linker<A: Address>(
    engine: &Engine,
    legacy: bool,
) -> wasmtime::Result<Linker<StoreData>> {
    let mut l = Linker::new(engine);
    let m = "ic0";

    // Message arguments and caller.
    l.func_wrap(m, "msg_arg_data_size", |mut c: C<'_>| {
        api_call(&mut c, "msg_arg_data_size", mask::ARG, |api, _| {
            Ok(A::from_u64(api.msg_arg_data_size()))
        })
    })?;
    l.func_wrap(m, "msg_arg_data_copy", |mut c: C<'_>, d: A, o: A, s: A| {
        api_call(&mut c, "msg_arg_data_copy", mask::ARG, |api, heap| {
            api.msg_arg_data_copy(heap, d.to_u64(), o.to_u64(), s.to_u64())
        })
    })?;
    l.func_wrap(m, "msg_caller_size", |mut c: C<'_>| {
        api_call(&mut c, "msg_caller_size", mask::ANY, |api, _| {
            Ok(A::from_u64(api.msg_caller_size()))
        })
    })?;
    l.func_wrap(m, "msg_caller_copy", |mut c: C<'_>, d: A, o: A, s: A| {
        api_call(&mut c, "msg_caller_copy", mask::ANY, |api, heap| {
            api.msg_caller_copy(heap, d.to_u64(), o.to_u64(), s.to_u64())
        })
    })?;
    for (size_name, copy_name) in [
        ("msg_caller_info_data_size", "msg_caller_info_data_copy"),
        ("msg_caller_info_signer_size", "msg_caller_info_signer_copy"),
    ] {
        l.func_wrap(m, size_name, move |mut c: C<'_>| {
            api_call(&mut c, size_name, mask::CALLER_INFO, |_, _| {
                Ok(A::from_u64(0))
            })
        })?;
        l.func_wrap(m, copy_name, move |mut c: C<'_>, d: A, o: A, s: A| {
            api_call(&mut c, copy_name, mask::CALLER_INFO, |api, heap| {
                api.empty_copy(heap, d.to_u64(), o.to_u64(), s.to_u64(), copy_name)
            })
        })?;
    }
    l.func_wrap(m, "msg_method_name_size", |mut c: C<'_>| {
        api_call(&mut c, "msg_method_name_size", mask::INSPECT, |api, _| {
            Ok(A::from_u64(api.msg_method_name_size()))
        })
    })?;
    l.func_wrap(
        m,
        "msg_method_name_copy",
        |mut c: C<'_>, d: A, o: A, s: A| {
            api_call(
                &mut c,
                "msg_method_name_copy",
                mask::INSPECT,
                |api, heap| api.msg_method_name_copy(heap, d.to_u64(), o.to_u64(), s.to_u64()),
            )
        },
    )?;
    l.func_wrap(m, "accept_message", |mut c: C<'_>| {
        api_call(&mut c, "accept_message", mask::INSPECT, |api, _| {
            api.accept_message()
        })
    })?;

    // Reject information and deadline.
    l.func_wrap(m, "msg_reject_code", |mut c: C<'_>| {
        api_call(&mut c, "msg_reject_code", mask::REJECT_CODE, |api, _| {
            Ok(api.msg_reject_code())
        })
    })?;
    l.func_wrap(m, "msg_reject_msg_size", |mut c: C<'_>| {
        api_call(&mut c, "msg_reject_msg_size", mask::REJECT_MSG, |api, _| {
            Ok(A::from_u64(api.msg_reject_msg_size()))
        })
    })?;
    l.func_wrap(
        m,
        "msg_reject_msg_copy",
        |mut c: C<'_>, d: A, o: A, s: A| {
            api_call(
                &mut c,
                "msg_reject_msg_copy",
                mask::REJECT_MSG,
                |api, heap| api.msg_reject_msg_copy(heap, d.to_u64(), o.to_u64(), s.to_u64()),
            )
        },
    )?;
    l.func_wrap(m, "msg_deadline", |mut c: C<'_>| {
        api_call(&mut c, "msg_deadline", mask::REPLY, |api, _| {
            Ok(api.msg_deadline() as i64)
        })
    })?;

    // Responding.
    l.func_wrap(
        m,
        "msg_reply_data_append",
        |mut c: C<'_>, src: A, size: A| {
            api_call(&mut c, "msg_reply_data_append", mask::REPLY, |api, heap| {
                api.msg_reply_data_append(heap, src.to_u64(), size.to_u64())
            })
        },
    )?;
    l.func_wrap(m, "msg_reply", |mut c: C<'_>| {
        api_call(&mut c, "msg_reply", mask::REPLY, |api, _| api.msg_reply())
    })?;
    l.func_wrap(m, "msg_reject", |mut c: C<'_>, src: A, size: A| {
        api_call(&mut c, "msg_reject", mask::REPLY, |api, heap| {
            api.msg_reject(heap, src.to_u64(), size.to_u64())
        })
    })?;

    // Cycles.
    l.func_wrap(m, "msg_cycles_available128", |mut c: C<'_>, dst: A| {
        api_call(
            &mut c,
            "msg_cycles_available128",
            mask::MSG_CYCLES,
            |api, heap| api.msg_cycles_available128(heap, dst.to_u64()),
        )
    })?;
    l.func_wrap(m, "msg_cycles_refunded128", |mut c: C<'_>, dst: A| {
        api_call(
            &mut c,
            "msg_cycles_refunded128",
            mask::REFUNDED,
            |api, heap| api.msg_cycles_refunded128(heap, dst.to_u64()),
        )
    })?;
    l.func_wrap(
        m,
        "msg_cycles_accept128",
        |mut c: C<'_>, high: i64, low: i64, dst: A| {
            api_call(
                &mut c,
                "msg_cycles_accept128",
                mask::MSG_CYCLES,
                |api, heap| api.msg_cycles_accept128(heap, amount_128(high, low), dst.to_u64()),
            )
        },
    )?;
    l.func_wrap(
        m,
        "cycles_burn128",
        |mut c: C<'_>, high: i64, low: i64, dst: A| {
            api_call(&mut c, "cycles_burn128", mask::BURN, |api, heap| {
                api.cycles_burn128(heap, amount_128(high, low), dst.to_u64())
            })
        },
    )?;
    l.func_wrap(m, "canister_cycle_balance128", |mut c: C<'_>, dst: A| {
        api_call(
            &mut c,
            "canister_cycle_balance128",
            mask::ANY,
            |api, heap| api.canister_cycle_balance128(heap, dst.to_u64()),
        )
    })?;
    l.func_wrap(
        m,
        "canister_liquid_cycle_balance128",
        |mut c: C<'_>, dst: A| {
            api_call(
                &mut c,
                "canister_liquid_cycle_balance128",
                mask::ANY,
                |api, heap| api.canister_liquid_cycle_balance128(heap, dst.to_u64()),
            )
        },
    )?;

    // Identity.
    l.func_wrap(m, "canister_self_size", |mut c: C<'_>| {
        api_call(&mut c, "canister_self_size", mask::ANY, |api, _| {
            Ok(A::from_u64(api.canister_self_size()))
        })
    })?;
    l.func_wrap(m, "canister_self_copy", |mut c: C<'_>, d: A, o: A, s: A| {
        api_call(&mut c, "canister_self_copy", mask::ANY, |api, heap| {
            api.canister_self_copy(heap, d.to_u64(), o.to_u64(), s.to_u64())
        })
    })?;
    l.func_wrap(m, "canister_status", |mut c: C<'_>| {
        api_call(&mut c, "canister_status", mask::ANY, |api, _| {
            Ok(api.canister_status())
        })
    })?;
    l.func_wrap(m, "canister_version", |mut c: C<'_>| {
        api_call(&mut c, "canister_version", mask::ANY, |api, _| {
            Ok(api.canister_version() as i64)
        })
    })?;
    l.func_wrap(m, "subnet_self_size", |mut c: C<'_>| {
        api_call(&mut c, "subnet_self_size", mask::ANY, |api, _| {
            Ok(A::from_u64(api.subnet_self_size()))
        })
    })?;
    l.func_wrap(m, "subnet_self_copy", |mut c: C<'_>, d: A, o: A, s: A| {
        api_call(&mut c, "subnet_self_copy", mask::ANY, |api, heap| {
            api.subnet_self_copy(heap, d.to_u64(), o.to_u64(), s.to_u64())
        })
    })?;
    l.func_wrap(m, "subnet_self_node_count", |mut c: C<'_>| {
        api_call(&mut c, "subnet_self_node_count", mask::ANY, |api, _| {
            Ok(api.subnet_self_node_count())
        })
    })?;

    // Calls.
    l.func_wrap(
        m,
        "call_new",
        |mut c: C<'_>,
         callee_src: A,
         callee_size: A,
         name_src: A,
         name_size: A,
         reply_fun: A,
         reply_env: A,
         reject_fun: A,
         reject_env: A| {
            api_call(&mut c, "call_new", mask::CALL, |api, heap| {
                api.call_new(
                    heap,
                    callee_src.to_u64(),
                    callee_size.to_u64(),
                    name_src.to_u64(),
                    name_size.to_u64(),
                    WasmClosure {
                        func_idx: reply_fun.to_u64(),
                        env: reply_env.to_u64(),
                    },
                    WasmClosure {
                        func_idx: reject_fun.to_u64(),
                        env: reject_env.to_u64(),
                    },
                )
            })
        },
    )?;
    l.func_wrap(m, "call_on_cleanup", |mut c: C<'_>, fun: A, env: A| {
        api_call(&mut c, "call_on_cleanup", mask::CALL, |api, _| {
            api.call_on_cleanup(WasmClosure {
                func_idx: fun.to_u64(),
                env: env.to_u64(),
            })
        })
    })?;
    l.func_wrap(m, "call_data_append", |mut c: C<'_>, src: A, size: A| {
        api_call(&mut c, "call_data_append", mask::CALL, |api, heap| {
            api.call_data_append(heap, src.to_u64(), size.to_u64())
        })
    })?;
    l.func_wrap(
        m,
        "call_with_best_effort_response",
        |mut c: C<'_>, timeout: i32| {
            api_call(
                &mut c,
                "call_with_best_effort_response",
                mask::CALL,
                |api, _| api.call_with_best_effort_response(timeout as u32),
            )
        },
    )?;
    l.func_wrap(
        m,
        "call_cycles_add128",
        |mut c: C<'_>, high: i64, low: i64| {
            api_call(&mut c, "call_cycles_add128", mask::CALL_CYCLES, |api, _| {
                api.call_cycles_add128(amount_128(high, low))
            })
        },
    )?;
    l.func_wrap(m, "call_perform", |mut c: C<'_>| {
        api_call(&mut c, "call_perform", mask::CALL, |api, _| {
            api.call_perform()
        })
    })?;

    // Stable memory.
    l.func_wrap(m, "stable64_size", |mut c: C<'_>| {
        api_call(&mut c, "stable64_size", mask::ANY_AND_START, |api, _| {
            Ok(api.stable_size() as i64)
        })
    })?;
    l.func_wrap(m, "stable64_grow", |mut c: C<'_>, pages: i64| {
        api_call(&mut c, "stable64_grow", mask::ANY_AND_START, |api, _| {
            Ok(api.stable_grow(pages as u64, u64::MAX))
        })
    })?;
    l.func_wrap(
        m,
        "stable64_write",
        |mut c: C<'_>, offset: i64, src: i64, size: i64| {
            cover_stable_write(&mut c, size as u64)?;
            api_call(
                &mut c,
                "stable64_write",
                mask::ANY_AND_START,
                |api, heap| {
                    api.stable_write(
                        heap,
                        offset as u64,
                        src as u64,
                        size as u64,
                        "stable64_write",
                    )
                },
            )
        },
    )?;
    l.func_wrap(
        m,
        "stable64_read",
        |mut c: C<'_>, dst: i64, offset: i64, size: i64| {
            api_call(&mut c, "stable64_read", mask::ANY_AND_START, |api, heap| {
                api.stable_read(
                    heap,
                    dst as u64,
                    offset as u64,
                    size as u64,
                    "stable64_read",
                )
            })
        },
    )?;

    // Certification.
    l.func_wrap(m, "certified_data_set", |mut c: C<'_>, src: A, size: A| {
        api_call(
            &mut c,
            "certified_data_set",
            mask::CERTIFIED_DATA,
            |api, heap| api.certified_data_set(heap, src.to_u64(), size.to_u64()),
        )
    })?;
    l.func_wrap(m, "data_certificate_present", |mut c: C<'_>| {
        api_call(&mut c, "data_certificate_present", mask::ANY, |api, _| {
            Ok(api.data_certificate_present())
        })
    })?;
    l.func_wrap(m, "data_certificate_size", |mut c: C<'_>| {
        api_call(
            &mut c,
            "data_certificate_size",
            mask::DATA_CERTIFICATE,
            |api, _| Ok(A::from_u64(api.data_certificate_size()?)),
        )
    })?;
    l.func_wrap(
        m,
        "data_certificate_copy",
        |mut c: C<'_>, d: A, o: A, s: A| {
            api_call(
                &mut c,
                "data_certificate_copy",
                mask::DATA_CERTIFICATE,
                |api, heap| api.data_certificate_copy(heap, d.to_u64(), o.to_u64(), s.to_u64()),
            )
        },
    )?;
    l.func_wrap(m, "root_key_size", |mut c: C<'_>| {
        api_call(&mut c, "root_key_size", mask::ROOT_KEY, |api, _| {
            Ok(A::from_u64(api.root_key_size()))
        })
    })?;
    l.func_wrap(m, "root_key_copy", |mut c: C<'_>, d: A, o: A, s: A| {
        api_call(&mut c, "root_key_copy", mask::ROOT_KEY, |api, heap| {
            api.root_key_copy(heap, d.to_u64(), o.to_u64(), s.to_u64())
        })
    })?;

    // Time, timer, miscellaneous.
    l.func_wrap(m, "time", |mut c: C<'_>| {
        api_call(&mut c, "time", mask::ANY, |api, _| Ok(api.time() as i64))
    })?;
    l.func_wrap(m, "global_timer_set", |mut c: C<'_>, timestamp: i64| {
        api_call(&mut c, "global_timer_set", mask::TIMER, |api, _| {
            Ok(api.global_timer_set(timestamp as u64) as i64)
        })
    })?;
    l.func_wrap(m, "performance_counter", |mut c: C<'_>, counter: i32| {
        api_call(
            &mut c,
            "performance_counter",
            mask::ANY_AND_START,
            |api, _| Ok(api.performance_counter(counter)? as i64),
        )
    })?;
    l.func_wrap(m, "is_controller", |mut c: C<'_>, src: A, size: A| {
        api_call(&mut c, "is_controller", mask::ANY_AND_START, |api, heap| {
            api.is_controller(heap, src.to_u64(), size.to_u64())
        })
    })?;
    l.func_wrap(m, "in_replicated_execution", |mut c: C<'_>| {
        api_call(
            &mut c,
            "in_replicated_execution",
            mask::ANY_AND_START,
            |api, _| Ok(api.in_replicated_execution()),
        )
    })?;

    // Costs.
    l.func_wrap(
        m,
        "cost_call",
        |mut c: C<'_>, method_size: i64, payload_size: i64, dst: A| {
            api_call(&mut c, "cost_call", mask::ANY_AND_START, |api, heap| {
                let cost = api.cost_call(method_size as u64, payload_size as u64);
                api.write_cost(heap, dst.to_u64(), cost, "cost_call")
            })
        },
    )?;
    l.func_wrap(m, "cost_create_canister", |mut c: C<'_>, dst: A| {
        api_call(
            &mut c,
            "cost_create_canister",
            mask::ANY_AND_START,
            |api, heap| {
                let cost = api.cost_create_canister();
                api.write_cost(heap, dst.to_u64(), cost, "cost_create_canister")
            },
        )
    })?;
    l.func_wrap(
        m,
        "cost_http_request",
        |mut c: C<'_>, request_size: i64, max_response: i64, dst: A| {
            api_call(
                &mut c,
                "cost_http_request",
                mask::ANY_AND_START,
                |api, heap| {
                    let cost = api.cost_http_request(request_size as u64, max_response as u64);
                    api.write_cost(heap, dst.to_u64(), cost, "cost_http_request")
                },
            )
        },
    )?;
    l.func_wrap(
        m,
        "cost_http_request_v2",
        |mut c: C<'_>, src: A, size: A, dst: A| {
            api_call(
                &mut c,
                "cost_http_request_v2",
                mask::ANY_AND_START,
                |api, heap| {
                    // Checked before the heap is touched: a huge `size` costs nothing to refuse.
                    api.check_cost_http_request_v2_size(size.to_u64())?;
                    let params = crate::system_api::heap_read(
                        heap,
                        src.to_u64(),
                        size.to_u64(),
                        "cost_http_request_v2",
                    )?;
                    let cost = api.cost_http_request_v2(params)?;
                    api.write_cost(heap, dst.to_u64(), cost, "cost_http_request_v2")
                },
            )
        },
    )?;
    for (name, algorithm) in [
        (
            "cost_sign_with_ecdsa",
            ChainKeyAlgorithm::ecdsa_from_code as fn(u32) -> Option<ChainKeyAlgorithm>,
        ),
        (
            "cost_sign_with_schnorr",
            ChainKeyAlgorithm::schnorr_from_code,
        ),
        ("cost_vetkd_derive_key", ChainKeyAlgorithm::vetkd_from_code),
    ] {
        l.func_wrap(
            m,
            name,
            move |mut c: C<'_>, src: A, size: A, curve: i32, dst: A| {
                api_call(&mut c, name, mask::ANY_AND_START, |api, heap| {
                    match api.cost_threshold_key(
                        heap,
                        src.to_u64(),
                        size.to_u64(),
                        algorithm(curve as u32),
                        name,
                    )? {
                        Ok(cost) => {
                            api.write_cost(heap, dst.to_u64(), cost, name)?;
                            Ok(0)
                        }
                        Err(code) => Ok(code),
                    }
                })
            },
        )?;
    }

    // Environment variables.
    l.func_wrap(m, "env_var_count", |mut c: C<'_>| {
        api_call(&mut c, "env_var_count", mask::ANY, |api, _| {
            Ok(A::from_u64(api.env_var_count()))
        })
    })?;
    l.func_wrap(m, "env_var_name_size", |mut c: C<'_>, index: A| {
        api_call(&mut c, "env_var_name_size", mask::ANY, |api, _| {
            Ok(A::from_u64(api.env_var_name_size(index.to_u64())?))
        })
    })?;
    l.func_wrap(
        m,
        "env_var_name_copy",
        |mut c: C<'_>, index: A, d: A, o: A, s: A| {
            api_call(&mut c, "env_var_name_copy", mask::ANY, |api, heap| {
                api.env_var_name_copy(heap, index.to_u64(), d.to_u64(), o.to_u64(), s.to_u64())
            })
        },
    )?;
    l.func_wrap(m, "env_var_name_exists", |mut c: C<'_>, src: A, size: A| {
        api_call(&mut c, "env_var_name_exists", mask::ANY, |api, heap| {
            api.env_var_name_exists(heap, src.to_u64(), size.to_u64())
        })
    })?;
    l.func_wrap(m, "env_var_value_size", |mut c: C<'_>, src: A, size: A| {
        api_call(&mut c, "env_var_value_size", mask::ANY, |api, heap| {
            Ok(A::from_u64(api.env_var_value_size(
                heap,
                src.to_u64(),
                size.to_u64(),
            )?))
        })
    })?;
    l.func_wrap(
        m,
        "env_var_value_copy",
        |mut c: C<'_>, name_src: A, name_size: A, d: A, o: A, s: A| {
            api_call(&mut c, "env_var_value_copy", mask::ANY, |api, heap| {
                api.env_var_value_copy(
                    heap,
                    name_src.to_u64(),
                    name_size.to_u64(),
                    d.to_u64(),
                    o.to_u64(),
                    s.to_u64(),
                )
            })
        },
    )?;

    // Debugging.
    l.func_wrap(m, "debug_print", |mut c: C<'_>, src: A, size: A| {
        api_call(&mut c, "debug_print", mask::ANY_AND_START, |api, heap| {
            api.debug_print(heap, src.to_u64(), size.to_u64());
            Ok(())
        })
    })?;
    l.func_wrap(m, "trap", |mut c: C<'_>, src: A, size: A| {
        api_call(&mut c, "trap", mask::ANY_AND_START, |api, heap| {
            Err::<(), _>(api.trap(heap, src.to_u64(), size.to_u64()))
        })
    })?;

    if legacy {
        define_legacy(&mut l)?;
    }
    Ok(l)
}

/// The wasm32-only cycles (64-bit) and stable memory (32-bit) functions.
fn define_legacy(l: &mut Linker<StoreData>) -> wasmtime::Result<()> {
    let m = "ic0";
    l.func_wrap(m, "msg_cycles_available", |mut c: C<'_>| {
        api_call(
            &mut c,
            "msg_cycles_available",
            mask::MSG_CYCLES,
            |api, _| Ok(api.cycles_available_64()? as i64),
        )
    })?;
    l.func_wrap(m, "msg_cycles_refunded", |mut c: C<'_>| {
        api_call(&mut c, "msg_cycles_refunded", mask::REFUNDED, |api, _| {
            Ok(api.cycles_refunded_64()? as i64)
        })
    })?;
    l.func_wrap(m, "msg_cycles_accept", |mut c: C<'_>, max: i64| {
        api_call(&mut c, "msg_cycles_accept", mask::MSG_CYCLES, |api, _| {
            Ok(api.accept_cycles(max as u64 as u128).get() as i64)
        })
    })?;
    l.func_wrap(m, "canister_cycle_balance", |mut c: C<'_>| {
        api_call(&mut c, "canister_cycle_balance", mask::ANY, |api, _| {
            Ok(api.balance_64()? as i64)
        })
    })?;
    l.func_wrap(m, "call_cycles_add", |mut c: C<'_>, amount: i64| {
        api_call(&mut c, "call_cycles_add", mask::CALL_CYCLES, |api, _| {
            api.call_cycles_add128(amount as u64 as u128)
        })
    })?;
    l.func_wrap(m, "stable_size", |mut c: C<'_>| {
        api_call(&mut c, "stable_size", mask::ANY_AND_START, |api, _| {
            api.stable_size_32()
        })
    })?;
    l.func_wrap(m, "stable_grow", |mut c: C<'_>, pages: i32| {
        api_call(&mut c, "stable_grow", mask::ANY_AND_START, |api, _| {
            Ok(api.stable_grow(pages as u32 as u64, MAX_LEGACY_STABLE_PAGES) as i32)
        })
    })?;
    l.func_wrap(
        m,
        "stable_write",
        |mut c: C<'_>, offset: i32, src: i32, size: i32| {
            cover_stable_write(&mut c, size as u32 as u64)?;
            api_call(&mut c, "stable_write", mask::ANY_AND_START, |api, heap| {
                api.stable_write(
                    heap,
                    offset as u32 as u64,
                    src as u32 as u64,
                    size as u32 as u64,
                    "stable_write",
                )
            })
        },
    )?;
    l.func_wrap(
        m,
        "stable_read",
        |mut c: C<'_>, dst: i32, offset: i32, size: i32| {
            api_call(&mut c, "stable_read", mask::ANY_AND_START, |api, heap| {
                api.stable_read(
                    heap,
                    dst as u32 as u64,
                    offset as u32 as u64,
                    size as u32 as u64,
                    "stable_read",
                )
            })
        },
    )?;
    Ok(())
}
