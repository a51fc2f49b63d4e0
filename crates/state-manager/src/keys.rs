//! Key storage: the subnet's BLS signing key, the node's Ed25519 key, and the genesis seed.
//!
//! Each is created once, on first start, and kept for the life of the state directory: the subnet
//! key is the root key clients have cached, the node key signs query responses, and the genesis seed
//! is the start of the state's randomness (replaying blocks from genesis with another seed would
//! give another state). Files are written atomically with mode 0600 in `<state_dir>/keys/` (mode
//! 0700). A missing file in a directory that already holds blocks or checkpoints is an error, not a
//! reason to make a new one.

use crate::fs_util::{corrupt, create_dir_durably, io_error, write_file_atomically};
use openic_crypto::{NodeKey, SubnetSigningKey};
use openic_interfaces::StorageError;
use rand::RngCore;
use std::path::{Path, PathBuf};

/// Directory under the state directory holding the key files.
pub const KEYS_DIR: &str = "keys";

/// File (in [`KEYS_DIR`]) holding the subnet BLS secret key (32 bytes).
pub const SUBNET_KEY_FILE: &str = "subnet_signing_key.bls";

/// File (in [`KEYS_DIR`]) holding the node Ed25519 secret key (32 bytes).
pub const NODE_KEY_FILE: &str = "node_key.ed25519";

/// File (in the state directory) holding the 32-byte genesis seed.
pub const GENESIS_SEED_FILE: &str = "genesis_seed";

/// Permission bits of secret files.
const SECRET_FILE_MODE: u32 = 0o600;

/// Permission bits of the keys directory.
const KEYS_DIR_MODE: u32 = 0o700;

/// The node's long-lived keys.
#[derive(Debug)]
pub struct NodeKeys {
    /// Signs certified state; its public key is the root key clients verify certificates with.
    pub subnet_signing_key: SubnetSigningKey,
    /// Signs query responses; its principal is the node id.
    pub node_key: NodeKey,
}

/// Loads the node's keys from `<state_dir>/keys/`, creating each that does not exist yet.
///
/// Errors: [`StorageError::Corrupt`] if a key file does not hold a valid key, or if a key file is
/// missing while the directory already holds blocks or checkpoints (a new key would change the root
/// key clients trust); [`StorageError::Io`] on file-system errors.
pub fn load_or_create_keys(state_dir: &Path) -> Result<NodeKeys, StorageError> {
    let dir = state_dir.join(KEYS_DIR);
    create_keys_dir(&dir)?;
    let subnet_signing_key = load_or_create(
        state_dir,
        &dir,
        SUBNET_KEY_FILE,
        || SubnetSigningKey::generate().secret_bytes(),
        |bytes| SubnetSigningKey::from_secret_bytes(bytes).map_err(|e| e.to_string()),
    )?;
    let node_key = load_or_create(
        state_dir,
        &dir,
        NODE_KEY_FILE,
        || NodeKey::generate().secret_bytes(),
        |bytes| NodeKey::from_secret_bytes(bytes).map_err(|e| e.to_string()),
    )?;
    Ok(NodeKeys {
        subnet_signing_key,
        node_key,
    })
}

/// Loads the genesis seed from `<state_dir>/genesis_seed`, creating a random one on first start.
/// Pass it to `ReplicatedState::new`.
///
/// Errors: as for [`load_or_create_keys`].
pub fn load_or_create_genesis_seed(state_dir: &Path) -> Result<[u8; 32], StorageError> {
    create_dir_durably(state_dir)?;
    load_or_create(
        state_dir,
        state_dir,
        GENESIS_SEED_FILE,
        || {
            let mut seed = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut seed);
            seed
        },
        |bytes| {
            <[u8; 32]>::try_from(bytes)
                .map_err(|_| format!("expected 32 bytes, found {}", bytes.len()))
        },
    )
}

/// Loads a node identity (the Ed25519 key that names a replica to its peers and signs its query
/// responses) from the file at `path`, creating the file with a new key if it does not exist.
/// Operators make one per machine with `openic identity` and list its public key in the genesis
/// file; it is stored raw (32 bytes), mode 0600.
pub fn load_or_create_identity(path: &Path) -> Result<NodeKey, StorageError> {
    let (dir, name) = split_file_path(path)?;
    create_dir_durably(dir)?;
    // The identity file lives outside any state directory: `dir` stands in for one, and holds no
    // blocks, so a missing file is simply created.
    load_or_create(
        dir,
        dir,
        name,
        || NodeKey::generate().secret_bytes(),
        |bytes| NodeKey::from_secret_bytes(bytes).map_err(|e| e.to_string()),
    )
}

/// Reads a secret file written by [`store_secret`], or `None` if it does not exist.
pub fn load_secret(state_dir: &Path, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
    let path = state_dir.join(KEYS_DIR).join(name);
    match std::fs::read(&path) {
        Ok(bytes) => {
            warn_if_readable_by_others(&path);
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path)(e)),
    }
}

/// Stores `bytes` as secret file `name` in `<state_dir>/keys/`, atomically and durably, mode 0600
/// (a replica's share of the subnet key, once the key generation at genesis has finished).
pub fn store_secret(state_dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let dir = state_dir.join(KEYS_DIR);
    create_dir_durably(state_dir)?;
    create_keys_dir(&dir)?;
    write_file_atomically(&dir, name, bytes, Some(SECRET_FILE_MODE)).map(|_| ())
}

fn split_file_path(path: &Path) -> Result<(&Path, &str), StorageError> {
    let name = path.file_name().and_then(|name| name.to_str());
    match (path.parent(), name) {
        (Some(dir), Some(name)) => Ok((
            if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            },
            name,
        )),
        _ => Err(corrupt(
            path,
            "not a file path with a UTF-8 file name".to_string(),
        )),
    }
}

fn create_keys_dir(dir: &Path) -> Result<(), StorageError> {
    if !dir.is_dir() {
        create_dir_durably(dir)?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(KEYS_DIR_MODE))
            .map_err(io_error(dir))?;
    }
    Ok(())
}

/// Reads `dir/name` and parses it, or creates it with `generate` if it does not exist.
fn load_or_create<T>(
    state_dir: &Path,
    dir: &Path,
    name: &str,
    generate: impl FnOnce() -> [u8; 32],
    parse: impl Fn(&[u8]) -> Result<T, String>,
) -> Result<T, StorageError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => {
            warn_if_readable_by_others(&path);
            parse(&bytes).map_err(|reason| {
                corrupt(
                    &path,
                    format!(
                        "{reason}; restore the file from a backup or use a new state directory"
                    ),
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(existing) = existing_data(state_dir)? {
                return Err(corrupt(
                    &path,
                    format!(
                        "the file is missing but the state directory already holds {}; restore \
                         the file from a backup (a new one would not match the existing state), \
                         or start with an empty state directory",
                        existing.display()
                    ),
                ));
            }
            let secret = generate();
            let parsed = parse(&secret).map_err(|reason| corrupt(&path, reason))?;
            write_file_atomically(dir, name, &secret, Some(SECRET_FILE_MODE))?;
            tracing::info!(path = %path.display(), "created a new secret");
            Ok(parsed)
        }
        Err(e) => Err(io_error(&path)(e)),
    }
}

/// A block log segment or checkpoint in `state_dir`, if there is any.
fn existing_data(state_dir: &Path) -> Result<Option<PathBuf>, StorageError> {
    for sub in ["blocks", "checkpoints"] {
        let dir = state_dir.join(sub);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error(&dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_data = name.ends_with(".blocks")
                || (name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()));
            if is_data {
                return Ok(Some(entry.path()));
            }
        }
    }
    Ok(None)
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = std::fs::metadata(path)
            && metadata.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "secret file is readable by other users; run `chmod 600` on it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_across_reload() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_keys(dir.path()).unwrap();
        let second = load_or_create_keys(dir.path()).unwrap();
        assert_eq!(
            first.subnet_signing_key.public_key_der(),
            second.subnet_signing_key.public_key_der()
        );
        assert_eq!(first.node_key.node_id(), second.node_key.node_id());
        let seed = load_or_create_genesis_seed(dir.path()).unwrap();
        assert_eq!(seed, load_or_create_genesis_seed(dir.path()).unwrap());
        assert_ne!(seed, [0u8; 32]);

        let other = tempfile::tempdir().unwrap();
        let fresh = load_or_create_keys(other.path()).unwrap();
        assert_ne!(
            fresh.subnet_signing_key.public_key_der(),
            first.subnet_signing_key.public_key_der()
        );
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        load_or_create_keys(dir.path()).unwrap();
        load_or_create_genesis_seed(dir.path()).unwrap();
        for path in [
            dir.path().join(KEYS_DIR).join(SUBNET_KEY_FILE),
            dir.path().join(KEYS_DIR).join(NODE_KEY_FILE),
            dir.path().join(GENESIS_SEED_FILE),
        ] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
        let mode = std::fs::metadata(dir.path().join(KEYS_DIR))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn damaged_or_missing_key_with_existing_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_keys(dir.path()).unwrap();
        let key_path = dir.path().join(KEYS_DIR).join(SUBNET_KEY_FILE);
        std::fs::write(&key_path, [0xffu8; 32]).unwrap();
        let error = load_or_create_keys(dir.path()).unwrap_err();
        assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");

        std::fs::remove_file(&key_path).unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoints").join(format!("{:020}", 5))).unwrap();
        let error = load_or_create_keys(dir.path()).unwrap_err();
        assert!(error.to_string().contains("restore the file"), "{error}");
        let error = load_or_create_genesis_seed(dir.path()).unwrap_err();
        assert!(error.to_string().contains("restore the file"), "{error}");
    }
}
