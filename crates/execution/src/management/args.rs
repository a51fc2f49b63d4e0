//! Decoding management arguments under quotas, and validating and applying canister settings.

use super::errors::{self, ManagementError};
use candid::de::DecoderConfig;
use candid::{CandidType, Nat, Principal};
use ic_management_canister_types as mct;
use openic_replicated_state::{CanisterSettings, Visibility};
use openic_types::UserError;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

pub(super) use mct::{
    CanisterIdRecord, ProvisionalCreateCanisterWithCyclesArgs as ProvisionalCreateArgs,
};

/// Most controllers a canister may have.
pub(super) const MAX_CONTROLLERS: usize = 10;
/// Most principals in an `allowed_viewers` list.
pub(super) const MAX_ALLOWED_VIEWERS: usize = 10;
/// Highest compute allocation, in percent.
const MAX_COMPUTE_ALLOCATION: u64 = 100;
/// Highest memory allocation and wasm memory limit: 2^48 bytes (256 TiB), as the spec allows.
const MAX_MEMORY_SETTING_BYTES: u64 = 1 << 48;
/// Most environment variables a canister may have.
pub(super) const MAX_ENVIRONMENT_VARIABLES: usize = 20;
/// Longest environment variable name, in bytes.
pub(super) const MAX_ENVIRONMENT_VARIABLE_NAME_BYTES: usize = 128;
/// Longest environment variable value, in bytes.
pub(super) const MAX_ENVIRONMENT_VARIABLE_VALUE_BYTES: usize = 128;

/// Decoding work allowed per payload byte (Candid's cost model charges skipped values 50x, and a
/// blob about 4 units per byte), plus a fixed allowance for small payloads. This bounds the work a
/// hostile payload (for example `vec null` with a huge length) can cause.
const DECODING_COST_PER_BYTE: usize = 250;
/// Fixed decoding allowance.
const DECODING_COST_BASE: usize = 1_000_000;
/// Skipping work allowed per payload byte.
const SKIPPING_COST_PER_BYTE: usize = 8;

/// Just the `target_canister` of an `install_chunked_code` argument (for the effective canister id
/// check; the other fields are skipped).
#[derive(CandidType, Deserialize)]
pub(super) struct ChunkedTarget {
    pub target_canister: Principal,
}

/// Just the `canister_id` of an argument (for the effective canister id check).
pub(super) type CanisterIdOnly = CanisterIdRecord;

/// Decodes the single Candid argument of `method` as `T`, under decoding quotas. Extra arguments
/// and unknown record fields are ignored; a record where `opt record` is expected is accepted.
pub(super) fn decode<'a, T>(method: &str, payload: &'a [u8]) -> Result<T, UserError>
where
    T: Deserialize<'a> + CandidType,
{
    let mut config = DecoderConfig::new();
    config
        .set_decoding_quota(
            payload
                .len()
                .saturating_mul(DECODING_COST_PER_BYTE)
                .saturating_add(DECODING_COST_BASE),
        )
        .set_skipping_quota(
            payload
                .len()
                .saturating_mul(SKIPPING_COST_PER_BYTE)
                .saturating_add(DECODING_COST_BASE),
        )
        .set_full_error_message(false);
    candid::utils::decode_one_with_config(payload, &config)
        .map_err(|error| errors::invalid_argument(method, error))
}

/// Encodes a reply value. Encoding the management types cannot fail; should it ever, the error is
/// reported as a rejection rather than a panic.
pub(super) fn encode<T: CandidType>(value: &T) -> Result<Vec<u8>, UserError> {
    candid::encode_one(value).map_err(|error| {
        UserError::new(
            openic_types::ErrorCode::CanisterContractViolation,
            format!("The management canister could not encode its reply: {error}"),
        )
    })
}

/// A Candid `nat` as u128, or a rejection naming `what`.
pub(super) fn nat_to_u128(nat: &Nat, what: &str) -> Result<u128, UserError> {
    u128::try_from(nat.0.clone()).map_err(|_| {
        errors::invalid_settings(format!(
            "{what} is {nat}, which is larger than the maximum of {}",
            u128::MAX
        ))
    })
}

/// A Candid `nat` as u64, at most `max`, or a rejection naming `what`.
fn nat_to_u64_at_most(nat: &Nat, what: &str, max: u64) -> Result<u64, UserError> {
    match u64::try_from(nat.0.clone()) {
        Ok(value) if value <= max => Ok(value),
        _ => Err(errors::invalid_settings(format!(
            "{what} must be between 0 and {max}, but {nat} was given"
        ))),
    }
}

/// Validated settings: `None` = leave unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ValidSettings {
    pub controllers: Option<BTreeSet<Principal>>,
    pub compute_allocation: Option<u64>,
    pub memory_allocation: Option<u64>,
    pub freezing_threshold_seconds: Option<u64>,
    pub reserved_cycles_limit: Option<u128>,
    pub log_visibility: Option<Visibility>,
    pub log_memory_limit: Option<u64>,
    pub snapshot_visibility: Option<Visibility>,
    pub wasm_memory_limit: Option<u64>,
    pub wasm_memory_threshold: Option<u64>,
    pub environment_variables: Option<BTreeMap<String, String>>,
}

fn visibility(
    what: &str,
    allowed_viewers: Option<&Vec<Principal>>,
    public: bool,
) -> Result<Visibility, UserError> {
    match (allowed_viewers, public) {
        (Some(viewers), _) => {
            if viewers.len() > MAX_ALLOWED_VIEWERS {
                return Err(errors::invalid_settings(format!(
                    "{what} allows {} viewers, but at most {MAX_ALLOWED_VIEWERS} are allowed",
                    viewers.len()
                )));
            }
            let unique: BTreeSet<Principal> = viewers.iter().copied().collect();
            Ok(Visibility::AllowedViewers(unique.into_iter().collect()))
        }
        (None, true) => Ok(Visibility::Public),
        (None, false) => Ok(Visibility::Controllers),
    }
}

fn log_visibility(value: &mct::LogVisibility) -> Result<Visibility, UserError> {
    match value {
        mct::LogVisibility::Controllers => visibility("log_visibility", None, false),
        mct::LogVisibility::Public => visibility("log_visibility", None, true),
        mct::LogVisibility::AllowedViewers(viewers) => {
            visibility("log_visibility", Some(viewers), false)
        }
    }
}

fn snapshot_visibility(value: &mct::SnapshotVisibility) -> Result<Visibility, UserError> {
    match value {
        mct::SnapshotVisibility::Controllers => visibility("snapshot_visibility", None, false),
        mct::SnapshotVisibility::Public => visibility("snapshot_visibility", None, true),
        mct::SnapshotVisibility::AllowedViewers(viewers) => {
            visibility("snapshot_visibility", Some(viewers), false)
        }
    }
}

/// Checks every given setting against its range and converts it.
pub(super) fn validate_settings(
    settings: &mct::CanisterSettings,
) -> Result<ValidSettings, UserError> {
    let mut valid = ValidSettings::default();
    if let Some(controllers) = &settings.controllers {
        if controllers.len() > MAX_CONTROLLERS {
            return Err(errors::invalid_settings(format!(
                "at most {MAX_CONTROLLERS} controllers are allowed, but {} were given",
                controllers.len()
            )));
        }
        valid.controllers = Some(controllers.iter().copied().collect());
    }
    if let Some(value) = &settings.compute_allocation {
        valid.compute_allocation = Some(nat_to_u64_at_most(
            value,
            "compute_allocation",
            MAX_COMPUTE_ALLOCATION,
        )?);
    }
    if let Some(value) = &settings.memory_allocation {
        valid.memory_allocation = Some(nat_to_u64_at_most(
            value,
            "memory_allocation",
            MAX_MEMORY_SETTING_BYTES,
        )?);
    }
    if let Some(value) = &settings.freezing_threshold {
        valid.freezing_threshold_seconds =
            Some(nat_to_u64_at_most(value, "freezing_threshold", u64::MAX)?);
    }
    if let Some(value) = &settings.reserved_cycles_limit {
        valid.reserved_cycles_limit = Some(nat_to_u128(value, "reserved_cycles_limit")?);
    }
    if let Some(value) = &settings.log_visibility {
        valid.log_visibility = Some(log_visibility(value)?);
    }
    if let Some(value) = &settings.log_memory_limit {
        use openic_replicated_state::canister_log::{MAX_LOG_MEMORY_LIMIT, MIN_LOG_MEMORY_LIMIT};
        // The IC's refusals (IC0406) and texts; 0 turns the log off.
        let bytes = u64::try_from(value.0.clone()).unwrap_or(u64::MAX);
        if bytes > MAX_LOG_MEMORY_LIMIT {
            return Err(ManagementError::LogMemoryLimitTooHigh {
                bytes,
                limit: MAX_LOG_MEMORY_LIMIT,
            }
            .into());
        }
        if bytes != 0 && bytes < MIN_LOG_MEMORY_LIMIT {
            return Err(ManagementError::LogMemoryLimitTooLow {
                bytes,
                limit: MIN_LOG_MEMORY_LIMIT,
            }
            .into());
        }
        valid.log_memory_limit = Some(bytes);
    }
    if let Some(value) = &settings.snapshot_visibility {
        valid.snapshot_visibility = Some(snapshot_visibility(value)?);
    }
    if let Some(value) = &settings.wasm_memory_limit {
        valid.wasm_memory_limit = Some(nat_to_u64_at_most(
            value,
            "wasm_memory_limit",
            MAX_MEMORY_SETTING_BYTES,
        )?);
    }
    if let Some(value) = &settings.wasm_memory_threshold {
        valid.wasm_memory_threshold = Some(nat_to_u64_at_most(
            value,
            "wasm_memory_threshold",
            u64::MAX,
        )?);
    }
    if let Some(variables) = &settings.environment_variables {
        valid.environment_variables = Some(environment_variables(variables)?);
    }
    Ok(valid)
}

fn environment_variables(
    variables: &[mct::EnvironmentVariable],
) -> Result<BTreeMap<String, String>, UserError> {
    if variables.len() > MAX_ENVIRONMENT_VARIABLES {
        return Err(errors::invalid_settings(format!(
            "at most {MAX_ENVIRONMENT_VARIABLES} environment variables are allowed, but {} were given",
            variables.len()
        )));
    }
    let mut map = BTreeMap::new();
    for variable in variables {
        if variable.name.len() > MAX_ENVIRONMENT_VARIABLE_NAME_BYTES {
            return Err(errors::invalid_settings(format!(
                "the environment variable name '{}…' is {} bytes long, but at most {MAX_ENVIRONMENT_VARIABLE_NAME_BYTES} are allowed",
                variable.name.chars().take(16).collect::<String>(),
                variable.name.len()
            )));
        }
        if variable.value.len() > MAX_ENVIRONMENT_VARIABLE_VALUE_BYTES {
            return Err(errors::invalid_settings(format!(
                "the value of environment variable '{}' is {} bytes long, but at most {MAX_ENVIRONMENT_VARIABLE_VALUE_BYTES} are allowed",
                variable.name,
                variable.value.len()
            )));
        }
        if map
            .insert(variable.name.clone(), variable.value.clone())
            .is_some()
        {
            return Err(errors::invalid_settings(format!(
                "the environment variable '{}' is given more than once; names must be unique",
                variable.name
            )));
        }
    }
    Ok(map)
}

impl ValidSettings {
    /// Writes every given setting into `target` (controllers are separate: see the caller).
    pub(super) fn apply_to(&self, target: &mut CanisterSettings) {
        if let Some(value) = self.compute_allocation {
            target.compute_allocation = value;
        }
        if let Some(value) = self.memory_allocation {
            target.memory_allocation = value;
        }
        if let Some(value) = self.freezing_threshold_seconds {
            target.freezing_threshold_seconds = value;
        }
        if let Some(value) = self.reserved_cycles_limit {
            target.reserved_cycles_limit = value;
        }
        if let Some(value) = &self.log_visibility {
            target.log_visibility = value.clone();
        }
        if let Some(value) = self.log_memory_limit {
            target.log_memory_limit = value;
        }
        if let Some(value) = &self.snapshot_visibility {
            target.snapshot_visibility = value.clone();
        }
        if let Some(value) = self.wasm_memory_limit {
            target.wasm_memory_limit = value;
        }
        if let Some(value) = self.wasm_memory_threshold {
            target.wasm_memory_threshold = value;
        }
        if let Some(value) = &self.environment_variables {
            target.environment_variables = value.clone();
        }
    }
}

/// Our visibility as the 0.8.0 log-visibility type.
pub(super) fn to_log_visibility(value: &Visibility) -> mct::LogVisibility {
    match value {
        Visibility::Controllers => mct::LogVisibility::Controllers,
        Visibility::Public => mct::LogVisibility::Public,
        Visibility::AllowedViewers(viewers) => mct::LogVisibility::AllowedViewers(viewers.clone()),
    }
}

/// Our visibility as the 0.8.0 snapshot-visibility type.
pub(super) fn to_snapshot_visibility(value: &Visibility) -> mct::SnapshotVisibility {
    match value {
        Visibility::Controllers => mct::SnapshotVisibility::Controllers,
        Visibility::Public => mct::SnapshotVisibility::Public,
        Visibility::AllowedViewers(viewers) => {
            mct::SnapshotVisibility::AllowedViewers(viewers.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candid::Encode;
    use openic_types::RejectCode;

    #[test]
    fn settings_encoded_as_plain_record_decode_where_opt_is_expected() {
        // ic-utils 0.49.3 sends `settings` as a plain record, not `opt record`.
        #[derive(CandidType)]
        struct In {
            amount: Option<Nat>,
            settings: mct::CanisterSettings,
            specified_id: Option<Principal>,
        }
        let controller = Principal::from_slice(&[7; 29]);
        let payload = Encode!(&In {
            amount: Some(Nat::from(5u64)),
            settings: mct::CanisterSettings {
                controllers: Some(vec![controller]),
                freezing_threshold: Some(Nat::from(77u64)),
                ..Default::default()
            },
            specified_id: None,
        })
        .unwrap();
        let args: ProvisionalCreateArgs =
            decode("provisional_create_canister_with_cycles", &payload).unwrap();
        let settings = args.settings.expect("record accepted as opt record");
        assert_eq!(settings.controllers, Some(vec![controller]));
        assert_eq!(settings.freezing_threshold, Some(Nat::from(77u64)));
        assert_eq!(args.amount, Some(Nat::from(5u64)));
    }

    #[test]
    fn unknown_fields_are_ignored_and_garbage_is_rejected() {
        #[derive(CandidType)]
        struct WithExtra {
            canister_id: Principal,
            something_new: String,
        }
        let id = Principal::from_slice(&[1, 2, 3]);
        let payload = Encode!(&WithExtra {
            canister_id: id,
            something_new: "x".into(),
        })
        .unwrap();
        let record: CanisterIdRecord = decode("canister_status", &payload).unwrap();
        assert_eq!(record.canister_id, id);

        for garbage in [
            &b""[..],
            b"DIDL",
            b"DIDL\x00\x00",
            b"\xff\xff\xff",
            b"DIDL\x01\x6d\x7f\x01\x00\xff\xff\xff\xff\x0f",
        ] {
            let error = decode::<CanisterIdRecord>("canister_status", garbage).unwrap_err();
            assert_eq!(error.code, RejectCode::CanisterReject);
            assert!(
                error.message.contains("canister_status"),
                "{}",
                error.message
            );
        }
    }

    #[test]
    #[allow(
        clippy::disallowed_methods,
        reason = "measures that hostile input is refused quickly"
    )]
    fn huge_null_vector_is_stopped_by_the_quota() {
        // `vec null` with 2^32-1 elements costs no memory and only a few bytes on the wire, but
        // billions of decoding steps without a quota.
        let payload = b"DIDL\x01\x6d\x7f\x01\x00\xff\xff\xff\xff\x0f";
        let started = std::time::Instant::now();
        let error = decode::<Vec<()>>("canister_status", payload).unwrap_err();
        assert!(
            error.message.contains("canister_status"),
            "{}",
            error.message
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn settings_are_validated_with_specific_messages() {
        let too_many = mct::CanisterSettings {
            controllers: Some((0..11u8).map(|i| Principal::from_slice(&[i])).collect()),
            ..Default::default()
        };
        let error = validate_settings(&too_many).unwrap_err();
        assert!(
            error.message.contains("at most 10 controllers"),
            "{}",
            error.message
        );

        let compute = mct::CanisterSettings {
            compute_allocation: Some(Nat::from(101u64)),
            ..Default::default()
        };
        let error = validate_settings(&compute).unwrap_err();
        assert!(
            error.message.contains("compute_allocation"),
            "{}",
            error.message
        );

        let duplicate = mct::CanisterSettings {
            environment_variables: Some(vec![
                mct::EnvironmentVariable {
                    name: "A".into(),
                    value: "1".into(),
                },
                mct::EnvironmentVariable {
                    name: "A".into(),
                    value: "2".into(),
                },
            ]),
            ..Default::default()
        };
        assert!(validate_settings(&duplicate).is_err());

        let good = mct::CanisterSettings {
            freezing_threshold: Some(Nat::from(10u64)),
            log_visibility: Some(mct::LogVisibility::Public),
            ..Default::default()
        };
        let valid = validate_settings(&good).unwrap();
        let mut settings = CanisterSettings::default();
        let before = settings.clone();
        valid.apply_to(&mut settings);
        assert_eq!(settings.freezing_threshold_seconds, 10);
        assert_eq!(settings.log_visibility, Visibility::Public);
        assert_eq!(settings.compute_allocation, before.compute_allocation);
        assert_eq!(settings.wasm_memory_limit, before.wasm_memory_limit);
    }
}
