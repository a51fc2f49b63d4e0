//! [`StateDirLock`]: one openic process per state directory.
//!
//! Two nodes writing one block log and one set of checkpoints would interleave their blocks and
//! destroy both. The lock is an advisory exclusive lock (`flock`) on `<state_dir>/LOCK`, held for
//! as long as the [`StateDirLock`] lives; the kernel releases it when the process exits, however
//! it exits (kill -9 included), so a stale lock file never blocks a restart. The file holds the
//! pid of the holder, for the error message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Name of the lock file in the state directory.
pub const LOCK_FILE: &str = "LOCK";

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum StateDirLockError {
    /// Another process holds the lock.
    #[error(
        "state directory {dir} is in use by another openic process ({holder}); stop that process \
         or choose another state directory"
    )]
    InUse {
        /// The state directory.
        dir: PathBuf,
        /// Who holds it, as far as the lock file says (`pid N`, or `pid unknown`).
        holder: String,
    },
    /// The lock file could not be created, read or locked.
    #[error("cannot lock the state directory through {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Exclusive use of a state directory, held until dropped.
#[derive(Debug)]
pub struct StateDirLock {
    file: File,
    path: PathBuf,
}

impl StateDirLock {
    /// Creates `state_dir` if needed and locks it for this process.
    ///
    /// Errors: [`StateDirLockError::InUse`] if another process (or another lock in this process)
    /// holds it; [`StateDirLockError::Io`] if the lock file cannot be created or locked.
    pub fn acquire(state_dir: &Path) -> Result<StateDirLock, StateDirLockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| StateDirLockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        // Not truncated on open: the holder's pid must survive a failed attempt to lock.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = match file.read_to_string(&mut text) {
                    Ok(_) => match text.trim().parse::<u32>() {
                        Ok(pid) => format!("pid {pid}"),
                        Err(_) => "pid unknown".to_string(),
                    },
                    Err(_) => "pid unknown".to_string(),
                };
                return Err(StateDirLockError::InUse {
                    dir: state_dir.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(StateDirLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StateDirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes the order explicit.
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateDirLock::acquire(dir.path()).unwrap();
        let error = StateDirLock::acquire(dir.path()).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, StateDirLockError::InUse { .. }));
        assert!(
            message.contains("in use by another openic process"),
            "{message}"
        );
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(lock);
        let again = StateDirLock::acquire(dir.path()).unwrap();
        assert_eq!(again.path(), dir.path().join(LOCK_FILE));
    }
}
