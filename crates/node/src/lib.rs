//! Wires every component into a running replica; the only crate that names implementations.
