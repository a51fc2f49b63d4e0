//! The certified state tree: incremental hashing, witnesses and BLS-signed certificates.
