//! The public IC HTTP interface: status, call (v2/v3/v4), query (v2/v3), read_state (v2/v3), CBOR envelopes and their validation.
