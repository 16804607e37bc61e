//! Random numbers for jitter and ids, without a dependency: each call
//! hashes nothing with a newly, randomly keyed SipHash (std's `RandomState`,
//! seeded from the operating system once per thread and then advanced).
//! Not for secrets.

use std::hash::{BuildHasher, Hasher};

/// A random 64-bit number.
pub fn u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::Instant::now().elapsed().as_nanos());
    h.finish()
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_differ() {
        let a: std::collections::BTreeSet<u64> = (0..100).map(|_| super::u64()).collect();
        assert!(a.len() > 95);
    }
}
