//! Self-authenticating principals: `SHA-224(DER public key) · 0x02`.

use candid::Principal;
use sha2::{Digest, Sha224};

/// The self-authenticating principal of a DER-encoded public key (users, node ids, subnet ids).
pub fn self_authenticating_principal(public_key_der: &[u8]) -> Principal {
    let mut bytes = Sha224::digest(public_key_der).to_vec();
    bytes.push(0x02);
    Principal::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candid_self_authenticating() {
        let der = [7u8; 44];
        assert_eq!(
            self_authenticating_principal(&der),
            Principal::self_authenticating(der)
        );
    }
}
