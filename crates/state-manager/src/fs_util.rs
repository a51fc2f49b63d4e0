//! Small filesystem helpers shared by the block log, the checkpoint store and key storage: error
//! mapping and the durable-write idioms (write, fsync the file, rename, fsync the directory).

use openic_interfaces::StorageError;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Maps an I/O error to [`StorageError::Io`] naming `path`.
pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A [`StorageError::Corrupt`] for `path`.
pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A [`StorageError::Io`] for a request the storage layer refuses (not a disk failure).
pub(crate) fn invalid_input(path: &Path, message: String) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
    }
}

/// Fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Creates `dir` (and missing parents) and makes its entry durable in its parent.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<(), StorageError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Creates a new file at `path` (which must not exist), writes `bytes`, and fsyncs it. With
/// `mode` the file is created with those permission bits (unix). The directory entry is not
/// synced: callers sync the directory once after writing several files.
pub(crate) fn write_new_file(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
) -> Result<(), StorageError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if let Some(mode) = mode {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(io_error(path))?;
    file.write_all(bytes).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// Replaces (or creates) `dir/name` atomically: writes `dir/name.tmp`, fsyncs it, renames it over
/// `dir/name`, and fsyncs `dir`. After a crash the file is either absent or complete.
pub(crate) fn write_file_atomically(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    mode: Option<u32>,
) -> Result<PathBuf, StorageError> {
    let path = dir.join(name);
    let temporary = dir.join(format!("{name}.tmp"));
    remove_file_if_exists(&temporary)?;
    write_new_file(&temporary, bytes, mode)?;
    std::fs::rename(&temporary, &path).map_err(io_error(&path))?;
    sync_dir(dir)?;
    Ok(path)
}

/// Removes `path` (a file) if it exists.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Removes `path` (a directory tree) if it exists.
pub(crate) fn remove_dir_if_exists(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}
