//! The openic command.
fn main() {}
