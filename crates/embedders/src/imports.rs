//! The ic0 import table: every System API function a module may import, its signature and the
//! execution contexts it may be called in (digest §5.2-§5.3). Validation and the linker both use
//! it, so a module passes validation exactly when every import it names resolves.

use crate::api::ApiType;

/// A parameter or result type of an ic0 function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ty {
    /// An address or size: `i32` for wasm32 modules (and modules without memory), `i64` for
    /// memory64 modules.
    Addr,
    /// Always `i32`.
    I32,
    /// Always `i64`.
    I64,
}

/// The execution context of one execution, as a bit (spec codes in the comments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Context {
    /// `I`: init or post_upgrade.
    Init,
    /// `G`: pre_upgrade.
    PreUpgrade,
    /// `U`: update.
    Update,
    /// `RQ`: query run replicated.
    ReplicatedQuery,
    /// `NRQ`: query run non-replicated.
    NonReplicatedQuery,
    /// `CQ`: composite query.
    CompositeQuery,
    /// `Ry`: reply callback.
    ReplyCallback,
    /// `Rt`: reject callback.
    RejectCallback,
    /// `CRy`: reply callback in a composite query.
    CompositeReplyCallback,
    /// `CRt`: reject callback in a composite query.
    CompositeRejectCallback,
    /// `C`: cleanup callback.
    Cleanup,
    /// `CC`: cleanup callback in a composite query.
    CompositeCleanup,
    /// `F`: inspect_message.
    InspectMessage,
    /// `T`: heartbeat, global timer, low-memory hook.
    SystemTask,
    /// `s`: the `(start)` function.
    Start,
}

impl Context {
    /// The context of an execution.
    pub(crate) fn of(api_type: &ApiType) -> Context {
        match api_type {
            ApiType::Init { .. } => Context::Init,
            ApiType::PreUpgrade { .. } => Context::PreUpgrade,
            ApiType::Update { .. } => Context::Update,
            ApiType::Query {
                replicated: true, ..
            } => Context::ReplicatedQuery,
            ApiType::Query {
                replicated: false, ..
            } => Context::NonReplicatedQuery,
            ApiType::CompositeQuery { .. } => Context::CompositeQuery,
            ApiType::ReplyCallback {
                in_composite_query: false,
                ..
            } => Context::ReplyCallback,
            ApiType::ReplyCallback {
                in_composite_query: true,
                ..
            } => Context::CompositeReplyCallback,
            ApiType::RejectCallback {
                in_composite_query: false,
                ..
            } => Context::RejectCallback,
            ApiType::RejectCallback {
                in_composite_query: true,
                ..
            } => Context::CompositeRejectCallback,
            ApiType::Cleanup {
                in_composite_query: false,
                ..
            } => Context::Cleanup,
            ApiType::Cleanup {
                in_composite_query: true,
                ..
            } => Context::CompositeCleanup,
            ApiType::InspectMessage { .. } => Context::InspectMessage,
            ApiType::SystemTask => Context::SystemTask,
            ApiType::Start => Context::Start,
        }
    }

    /// This context's bit in a context mask.
    pub(crate) fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// How error messages name this context.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Context::Init => "init",
            Context::PreUpgrade => "pre upgrade",
            Context::Update => "update",
            Context::ReplicatedQuery => "replicated query",
            Context::NonReplicatedQuery => "non replicated query",
            Context::CompositeQuery => "composite query",
            Context::ReplyCallback => "reply callback",
            Context::RejectCallback => "reject callback",
            Context::CompositeReplyCallback => "composite reply callback",
            Context::CompositeRejectCallback => "composite reject callback",
            Context::Cleanup => "cleanup",
            Context::CompositeCleanup => "composite cleanup",
            Context::InspectMessage => "inspect message",
            Context::SystemTask => "system task",
            Context::Start => "start",
        }
    }

    /// Whether executions in this context run replicated (`in_replicated_execution`).
    pub(crate) fn is_replicated(self) -> bool {
        !matches!(
            self,
            Context::NonReplicatedQuery
                | Context::CompositeQuery
                | Context::CompositeReplyCallback
                | Context::CompositeRejectCallback
                | Context::CompositeCleanup
                | Context::InspectMessage
        )
    }
}

/// Context masks of the digest's table.
pub(crate) mod mask {
    use super::Context::*;

    const fn b(c: super::Context) -> u32 {
        1 << (c as u32)
    }

    /// `*`: every context except `s`.
    pub const ANY: u32 = b(Init)
        | b(PreUpgrade)
        | b(Update)
        | b(ReplicatedQuery)
        | b(NonReplicatedQuery)
        | b(CompositeQuery)
        | b(ReplyCallback)
        | b(RejectCallback)
        | b(CompositeReplyCallback)
        | b(CompositeRejectCallback)
        | b(Cleanup)
        | b(CompositeCleanup)
        | b(InspectMessage)
        | b(SystemTask);
    /// `* s`.
    pub const ANY_AND_START: u32 = ANY | b(Start);
    /// `msg_arg_data_*`.
    pub const ARG: u32 = b(Init)
        | b(Update)
        | b(ReplicatedQuery)
        | b(NonReplicatedQuery)
        | b(CompositeQuery)
        | b(ReplyCallback)
        | b(CompositeReplyCallback)
        | b(InspectMessage);
    /// `msg_caller_info_*`.
    pub const CALLER_INFO: u32 = b(Update)
        | b(ReplicatedQuery)
        | b(NonReplicatedQuery)
        | b(CompositeQuery)
        | b(ReplyCallback)
        | b(RejectCallback)
        | b(CompositeReplyCallback)
        | b(CompositeRejectCallback)
        | b(Cleanup)
        | b(CompositeCleanup)
        | b(InspectMessage);
    /// `msg_method_name_*`, `accept_message`.
    pub const INSPECT: u32 = b(InspectMessage);
    /// `msg_reject_code`.
    pub const REJECT_CODE: u32 = b(ReplyCallback)
        | b(RejectCallback)
        | b(CompositeReplyCallback)
        | b(CompositeRejectCallback)
        | b(Cleanup)
        | b(CompositeCleanup);
    /// `msg_reject_msg_*`.
    pub const REJECT_MSG: u32 = b(RejectCallback) | b(CompositeRejectCallback);
    /// `msg_deadline` and `msg_reply*`/`msg_reject`.
    pub const REPLY: u32 = b(Update)
        | b(ReplicatedQuery)
        | b(NonReplicatedQuery)
        | b(CompositeQuery)
        | b(ReplyCallback)
        | b(RejectCallback)
        | b(CompositeReplyCallback)
        | b(CompositeRejectCallback);
    /// `msg_cycles_available128`, `msg_cycles_accept128`.
    pub const MSG_CYCLES: u32 =
        b(Update) | b(ReplicatedQuery) | b(RejectCallback) | b(ReplyCallback);
    /// `msg_cycles_refunded128`.
    pub const REFUNDED: u32 = b(RejectCallback) | b(ReplyCallback);
    /// `cycles_burn128`.
    pub const BURN: u32 = b(Init)
        | b(PreUpgrade)
        | b(Update)
        | b(ReplicatedQuery)
        | b(ReplyCallback)
        | b(RejectCallback)
        | b(Cleanup)
        | b(SystemTask);
    /// `call_new`, `call_on_cleanup`, `call_data_append`, `call_with_best_effort_response`,
    /// `call_perform`.
    pub const CALL: u32 = b(Update)
        | b(CompositeQuery)
        | b(ReplyCallback)
        | b(RejectCallback)
        | b(CompositeReplyCallback)
        | b(CompositeRejectCallback)
        | b(SystemTask);
    /// `call_cycles_add128`.
    pub const CALL_CYCLES: u32 = b(Update) | b(ReplyCallback) | b(RejectCallback) | b(SystemTask);
    /// `certified_data_set`.
    pub const CERTIFIED_DATA: u32 =
        b(Init) | b(PreUpgrade) | b(Update) | b(ReplyCallback) | b(RejectCallback) | b(SystemTask);
    /// `data_certificate_size/copy`.
    pub const DATA_CERTIFICATE: u32 = b(NonReplicatedQuery) | b(CompositeQuery);
    /// `root_key_*`.
    pub const ROOT_KEY: u32 = b(Init)
        | b(PreUpgrade)
        | b(Update)
        | b(ReplicatedQuery)
        | b(ReplyCallback)
        | b(RejectCallback)
        | b(Cleanup)
        | b(SystemTask);
    /// `global_timer_set`.
    pub const TIMER: u32 = b(Init)
        | b(PreUpgrade)
        | b(Update)
        | b(ReplyCallback)
        | b(RejectCallback)
        | b(Cleanup)
        | b(SystemTask);
}

/// One ic0 function.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ic0Import {
    /// Its name in module `ic0`.
    pub name: &'static str,
    /// Parameter types.
    pub params: &'static [Ty],
    /// Result types.
    pub results: &'static [Ty],
    /// Whether it exists only for wasm32 modules (the legacy 32/64-bit API).
    pub wasm32_only: bool,
}

const fn f(name: &'static str, params: &'static [Ty], results: &'static [Ty]) -> Ic0Import {
    Ic0Import {
        name,
        params,
        results,
        wasm32_only: false,
    }
}

const fn legacy(name: &'static str, params: &'static [Ty], results: &'static [Ty]) -> Ic0Import {
    Ic0Import {
        name,
        params,
        results,
        wasm32_only: true,
    }
}

use Ty::{Addr as A, I32, I64};

/// Every ic0 function (digest §5.3).
pub(crate) const IC0_IMPORTS: &[Ic0Import] = &[
    f("msg_arg_data_size", &[], &[A]),
    f("msg_arg_data_copy", &[A, A, A], &[]),
    f("msg_caller_size", &[], &[A]),
    f("msg_caller_copy", &[A, A, A], &[]),
    f("msg_caller_info_data_size", &[], &[A]),
    f("msg_caller_info_data_copy", &[A, A, A], &[]),
    f("msg_caller_info_signer_size", &[], &[A]),
    f("msg_caller_info_signer_copy", &[A, A, A], &[]),
    f("msg_method_name_size", &[], &[A]),
    f("msg_method_name_copy", &[A, A, A], &[]),
    f("accept_message", &[], &[]),
    f("msg_reject_code", &[], &[I32]),
    f("msg_reject_msg_size", &[], &[A]),
    f("msg_reject_msg_copy", &[A, A, A], &[]),
    f("msg_deadline", &[], &[I64]),
    f("msg_reply_data_append", &[A, A], &[]),
    f("msg_reply", &[], &[]),
    f("msg_reject", &[A, A], &[]),
    f("msg_cycles_available128", &[A], &[]),
    f("msg_cycles_refunded128", &[A], &[]),
    f("msg_cycles_accept128", &[I64, I64, A], &[]),
    f("cycles_burn128", &[I64, I64, A], &[]),
    f("canister_cycle_balance128", &[A], &[]),
    f("canister_liquid_cycle_balance128", &[A], &[]),
    f("canister_self_size", &[], &[A]),
    f("canister_self_copy", &[A, A, A], &[]),
    f("canister_status", &[], &[I32]),
    f("canister_version", &[], &[I64]),
    f("subnet_self_size", &[], &[A]),
    f("subnet_self_copy", &[A, A, A], &[]),
    f("subnet_self_node_count", &[], &[I32]),
    f("call_new", &[A, A, A, A, A, A, A, A], &[]),
    f("call_on_cleanup", &[A, A], &[]),
    f("call_data_append", &[A, A], &[]),
    f("call_with_best_effort_response", &[I32], &[]),
    f("call_cycles_add128", &[I64, I64], &[]),
    f("call_perform", &[], &[I32]),
    f("stable64_size", &[], &[I64]),
    f("stable64_grow", &[I64], &[I64]),
    f("stable64_write", &[I64, I64, I64], &[]),
    f("stable64_read", &[I64, I64, I64], &[]),
    f("certified_data_set", &[A, A], &[]),
    f("data_certificate_present", &[], &[I32]),
    f("data_certificate_size", &[], &[A]),
    f("data_certificate_copy", &[A, A, A], &[]),
    f("root_key_size", &[], &[A]),
    f("root_key_copy", &[A, A, A], &[]),
    f("time", &[], &[I64]),
    f("global_timer_set", &[I64], &[I64]),
    f("performance_counter", &[I32], &[I64]),
    f("is_controller", &[A, A], &[I32]),
    f("in_replicated_execution", &[], &[I32]),
    f("cost_call", &[I64, I64, A], &[]),
    f("cost_create_canister", &[A], &[]),
    f("cost_http_request", &[I64, I64, A], &[]),
    f("cost_http_request_v2", &[A, A, A], &[]),
    f("cost_sign_with_ecdsa", &[A, A, I32, A], &[I32]),
    f("cost_sign_with_schnorr", &[A, A, I32, A], &[I32]),
    f("cost_vetkd_derive_key", &[A, A, I32, A], &[I32]),
    f("env_var_count", &[], &[A]),
    f("env_var_name_size", &[A], &[A]),
    f("env_var_name_copy", &[A, A, A, A], &[]),
    f("env_var_name_exists", &[A, A], &[I32]),
    f("env_var_value_size", &[A, A], &[A]),
    f("env_var_value_copy", &[A, A, A, A, A], &[]),
    f("debug_print", &[A, A], &[]),
    f("trap", &[A, A], &[]),
    legacy("msg_cycles_available", &[], &[I64]),
    legacy("msg_cycles_refunded", &[], &[I64]),
    legacy("msg_cycles_accept", &[I64], &[I64]),
    legacy("canister_cycle_balance", &[], &[I64]),
    legacy("call_cycles_add", &[I64], &[]),
    legacy("stable_size", &[], &[I32]),
    legacy("stable_grow", &[I32], &[I32]),
    legacy("stable_write", &[I32, I32, I32], &[]),
    legacy("stable_read", &[I32, I32, I32], &[]),
];

/// The ic0 function called `name`, if any.
pub(crate) fn lookup(name: &str) -> Option<&'static Ic0Import> {
    IC0_IMPORTS.iter().find(|import| import.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = IC0_IMPORTS.iter().map(|i| i.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    #[test]
    fn composite_cleanup_is_non_replicated_without_burn_root_key_or_timer() {
        let composite_cleanup = Context::of(&ApiType::Cleanup {
            caller: candid::Principal::anonymous(),
            code: 0,
            in_composite_query: true,
        });
        assert_eq!(composite_cleanup, Context::CompositeCleanup);
        assert!(!composite_cleanup.is_replicated());
        for forbidden in [mask::BURN, mask::ROOT_KEY, mask::TIMER] {
            assert_eq!(forbidden & composite_cleanup.bit(), 0);
            assert_ne!(forbidden & Context::Cleanup.bit(), 0);
        }
        assert_ne!(mask::ANY & composite_cleanup.bit(), 0);
        assert_ne!(mask::REJECT_CODE & composite_cleanup.bit(), 0);
    }

    #[test]
    fn start_context_is_only_in_star_s_mask() {
        assert_eq!(mask::ANY & Context::Start.bit(), 0);
        assert_ne!(mask::ANY_AND_START & Context::Start.bit(), 0);
        assert_ne!(mask::ANY & Context::SystemTask.bit(), 0);
    }
}
