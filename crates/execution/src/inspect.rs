//! Ingress inspection: the non-replicated checks an update call must pass before it may enter
//! the ingress pool, including the canister's own `canister_inspect_message`.

use crate::common::{
    canister_not_found_error, check_can_pay, empty_canister_error, execution_fee,
    ingress_induction_fee, method_not_found_error, status_error, system_state_view,
};
use crate::config::{ExecutionConfig, SubnetContext};
use crate::management::check_management_ingress;
use openic_embedders::{ApiType, Embedder, EntryPoint, ExecutionError, MemoryBudget};
use openic_interfaces::{IngressInspector, StateSnapshotSource};
use openic_replicated_state::MethodKind;
use openic_types::{ErrorCode, SignedIngress, UserError};
use std::sync::Arc;

/// The export a canister uses to filter ingress.
const INSPECT_MESSAGE_EXPORT: &str = "canister_inspect_message";

/// Checks update calls against the latest certified state (the node's [`IngressInspector`]).
pub struct IngressFilter {
    embedder: Arc<dyn Embedder>,
    snapshots: Arc<dyn StateSnapshotSource>,
    config: ExecutionConfig,
    subnet: SubnetContext,
    memory_budget: Option<Arc<dyn MemoryBudget>>,
}

impl IngressFilter {
    /// An inspector over the snapshots of `snapshots`.
    pub fn new(
        embedder: Arc<dyn Embedder>,
        snapshots: Arc<dyn StateSnapshotSource>,
        config: ExecutionConfig,
        subnet: SubnetContext,
    ) -> Self {
        IngressFilter {
            embedder,
            snapshots,
            config,
            subnet,
            memory_budget: None,
        }
    }

    /// Makes every `canister_inspect_message` reserve the memory it touches from `budget` (Note
    /// [memory budget] in the embedder).
    pub fn with_memory_budget(mut self, budget: Arc<dyn MemoryBudget>) -> Self {
        self.memory_budget = Some(budget);
        self
    }
}

impl IngressInspector for IngressFilter {
    fn inspect(&self, message: &SignedIngress) -> Result<(), UserError> {
        let snapshot = self.snapshots.latest_snapshot();
        if message.canister_id.is_management() {
            return check_management_ingress(
                &message.method_name,
                &message.arg,
                &message.effective_canister_id,
                &message.sender,
                &snapshot.canisters,
            );
        }
        let id = message.canister_id;
        let canister = snapshot
            .canisters
            .get(&id)
            .ok_or_else(|| canister_not_found_error(&id))?;
        if let Some(error) = status_error(canister) {
            return Err(error);
        }
        let execution_state = canister
            .execution_state
            .as_ref()
            .ok_or_else(|| empty_canister_error(&id))?;
        match execution_state
            .module_info
            .methods
            .get(&message.method_name)
        {
            Some(MethodKind::Update) | Some(MethodKind::Query) => {}
            Some(MethodKind::CompositeQuery) => {
                return Err(UserError::new(
                    ErrorCode::CanisterMethodNotExported,
                    format!(
                        "Canister {} method '{}' is a composite query and can only be called as a query, not as an update.",
                        id.get(),
                        message.method_name
                    ),
                ));
            }
            None => {
                return Err(method_not_found_error(&id, "update", &message.method_name));
            }
        }
        let needed = ingress_induction_fee(&self.config, message.size_bytes).saturating_add(
            execution_fee(&self.config, self.config.max_instructions_per_update),
        );
        check_can_pay(&self.config, canister, needed)?;
        if !execution_state
            .module_info
            .system_methods
            .contains(INSPECT_MESSAGE_EXPORT)
        {
            return Ok(());
        }
        let view = system_state_view(
            &self.config,
            &self.subnet,
            canister,
            snapshot.time,
            canister.system_state.cycles_balance,
            false,
        );
        let api_type = ApiType::InspectMessage {
            caller: message.sender,
            method_name: message.method_name.clone(),
            arg: message.arg.clone(),
        };
        let mut input = crate::common::execution_input(
            &self.config,
            canister,
            execution_state,
            api_type,
            EntryPoint::Export(INSPECT_MESSAGE_EXPORT.to_string()),
            view,
            self.config.max_instructions_per_inspect,
        );
        input.memory_budget = self.memory_budget.clone();
        let output = self.embedder.execute(input);
        match output.result {
            // The node had no memory to run it: not the canister's rejection.
            Err(error @ ExecutionError::NodeMemoryBusy(_)) => {
                Err(crate::common::execution_error_to_user(&id, &error))
            }
            Ok((_, _, changes)) if changes.message_accepted => Ok(()),
            Ok(_) => Err(UserError::new(
                ErrorCode::CanisterRejectedMessage,
                format!(
                    "Canister {} rejected the message in canister_inspect_message (it did not call accept_message) for method '{}'.",
                    id.get(),
                    message.method_name
                ),
            )),
            Err(error) => Err(UserError::new(
                ErrorCode::CanisterRejectedMessage,
                format!(
                    "Canister {} rejected the message: canister_inspect_message failed for method '{}': {error}",
                    id.get(),
                    message.method_name
                ),
            )),
        }
    }
}
