//! Random bytes and ids: one source for all of them, the operating
//! system's (through ring, which TLS already uses). Secrets (cluster
//! tokens, device keys) and ids that must not repeat across restarts
//! (incarnations, message id starts) alike.

use ring::rand::{SecureRandom, SystemRandom};

/// `N` random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the operating system's random source");
    out
}

/// A random `u64`.
pub fn u64() -> u64 {
    u64::from_ne_bytes(bytes())
}
