//! Fill leases: one filler per key at a time.
//!
//! A cache that misses asks for a lease before it reads the origin. The first
//! caller gets a token bound to the seq it observed; everyone else learns that
//! a fill is in flight, with a suggested wait, and can serve stale or wait.
//! So there is one origin read per key per lease period, not one per caller.
//! The fill that carries the token releases it, and is refused when the key
//! or a dependency changed after the lease's seq (the store's usual
//! `observed_seq` rule). Leases expire on their own.
//!
//! Leases are soft state: they are not logged and do not survive a restart,
//! which at worst lets a second filler through once.

use std::hash::BuildHasher;

use hashbrown::HashMap;
use parking_lot::Mutex;

use crate::store::KeyHash;

/// A lease held on a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    token: u64,
    seq: u64,
    /// Clock ms.
    expires_at: u64,
}

/// The answer to a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The caller is the filler.
    Granted {
        /// Pass it to Fill.
        token: u64,
        /// The seq the lease observed.
        seq: u64,
        /// How long the lease lasts, ms.
        ttl_ms: u64,
    },
    /// Another caller is filling.
    InFlight {
        /// Until the other lease expires, ms.
        expires_in_ms: u64,
    },
}

/// The leases of all keys, in shards.
pub struct Leases {
    shards: Box<[Mutex<HashMap<String, Lease>>]>,
    mask: usize,
}

impl Leases {
    /// No leases, in `shards` shards (a power of two).
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            mask: shards - 1,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Lease>> {
        &self.shards[(KeyHash.hash_one(key) >> 32) as usize & self.mask]
    }

    /// Grants a lease on `key` at clock `now`, bound to `seq`, unless a live
    /// one exists.
    pub fn acquire(&self, key: &str, now: u64, seq: u64, ttl_ms: u64) -> LeaseOutcome {
        let mut shard = self.shard(key).lock();
        if let Some(lease) = shard.get(key) {
            if lease.expires_at > now {
                return LeaseOutcome::InFlight {
                    expires_in_ms: lease.expires_at - now,
                };
            }
        }
        let token = loop {
            let t: u64 = rand::random();
            if t != 0 {
                break t;
            }
        };
        shard.insert(
            key.to_owned(),
            Lease {
                token,
                seq,
                expires_at: now + ttl_ms,
            },
        );
        LeaseOutcome::Granted { token, seq, ttl_ms }
    }

    /// Releases the lease `token` on `key` and returns the seq it observed;
    /// `None` when the caller does not hold it (it expired, or was never
    /// granted).
    pub fn release(&self, key: &str, token: u64, now: u64) -> Option<u64> {
        let mut shard = self.shard(key).lock();
        match shard.get(key) {
            Some(lease) if lease.token == token && lease.expires_at > now => {
                let seq = lease.seq;
                shard.remove(key);
                Some(seq)
            }
            _ => None,
        }
    }

    /// Drops expired leases; returns how many.
    pub fn sweep(&self, now: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let before = shard.len();
            shard.retain(|_, l| l.expires_at > now);
            removed += before - shard.len();
        }
        removed
    }

    /// Leases held (live or not yet swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no lease is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_filler_at_a_time_until_release_or_expiry() {
        let leases = Leases::new(4);
        let LeaseOutcome::Granted { token, seq, .. } = leases.acquire("k", 10, 7, 100) else {
            panic!("first caller gets the lease");
        };
        assert_eq!(seq, 7);
        assert_eq!(
            leases.acquire("k", 50, 8, 100),
            LeaseOutcome::InFlight { expires_in_ms: 60 }
        );
        assert_eq!(leases.release("k", token ^ 1, 60), None, "wrong token");
        assert_eq!(leases.release("k", token, 60), Some(7));
        assert!(matches!(
            leases.acquire("k", 61, 9, 100),
            LeaseOutcome::Granted { .. }
        ));
        // Expiry frees the key for the next caller; the late token is refused.
        let LeaseOutcome::Granted { token, .. } = leases.acquire("j", 0, 1, 100) else {
            panic!()
        };
        assert!(matches!(
            leases.acquire("j", 100, 2, 100),
            LeaseOutcome::Granted { .. }
        ));
        assert_eq!(leases.release("j", token, 101), None);
        assert_eq!(leases.sweep(1_000), 2);
        assert!(leases.is_empty());
    }
}
