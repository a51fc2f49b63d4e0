//! Persistence: the block log, incremental verified checkpoints, and node key storage.
