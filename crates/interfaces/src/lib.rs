//! Traits and error enums between openic components; no implementations.
