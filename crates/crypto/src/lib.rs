//! Request signatures, delegations, self-authenticating principals, BLS root key and Ed25519 node key; wraps the official ic crates.
