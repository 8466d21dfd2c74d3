//! Freshness policies: per namespace, how old a served copy may be, when to
//! revalidate it in the background, and whether a critical change forces an
//! origin read; and the one table that turns a check into a decision.
//!
//! # The decision table
//! For a check of a copy of age `age` (what the client reports):
//!
//! | copy | condition (first match wins) | decision |
//! | --- | --- | --- |
//! | key not registered | | UNKNOWN |
//! | stale | a critical change since the copy, unless `allow_stale_on_critical` | REFETCH |
//! | stale | `max_age` set and `age > max_age` | REFETCH |
//! | stale | `age <= stale_while_revalidate` | REVALIDATE |
//! | stale | otherwise | REFETCH |
//! | current | `max_age` set and `age > max_age` | REFETCH |
//! | current | a soft purge covers the copy (it is older than the key's purge time) | REVALIDATE |
//! | current | `revalidate_after` set and `age > revalidate_after` | REVALIDATE |
//! | current | otherwise | FRESH |
//!
//! A stale copy cannot have been stale for longer than it has existed, so the
//! stale-while-revalidate window is measured on the copy's age: a
//! conservative bound that needs no per-version history. With every duration
//! at 0 (the built-in default) a current copy is FRESH and a stale one is
//! REFETCH.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::store::{CheckAnswer, Freshness};

/// The freshness policy of one namespace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Hard limit on a copy's age; `None`: none.
    pub max_age: Option<Duration>,
    /// Age after which a current copy is served and refreshed in the
    /// background; `None`: never.
    pub revalidate_after: Option<Duration>,
    /// Age up to which a stale copy (not critical) may still be served while
    /// it is refreshed; zero: never.
    pub stale_while_revalidate: Duration,
    /// Whether a critical change may be served stale like any other.
    pub allow_stale_on_critical: bool,
    /// The share of cache hits a client should version-check, 0 to 1.
    pub check_sample_rate: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_age: None,
            revalidate_after: None,
            stale_while_revalidate: Duration::ZERO,
            allow_stale_on_critical: false,
            check_sample_rate: 1.0,
        }
    }
}

impl Policy {
    /// Checks the policy's own consistency; `field` prefixes error messages.
    pub fn validate(&self, field: &str) -> Result<()> {
        if !(0.0..=1.0).contains(&self.check_sample_rate) {
            return Err(Error::invalid(format!(
                "{field}.check_sample_rate is {}; it must be between 0 and 1",
                self.check_sample_rate
            )));
        }
        if let (Some(max), Some(soft)) = (self.max_age, self.revalidate_after) {
            if soft > max {
                return Err(Error::invalid(format!(
                    "{field}.revalidate_after ({soft:?}) is above {field}.max_age ({max:?}): \
                     a copy would be refetched before it is ever revalidated"
                )));
            }
        }
        Ok(())
    }
}

/// What a cache should do with its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Serve it.
    Fresh,
    /// Serve it and refresh it in the background.
    Revalidate,
    /// Go to the origin now.
    Refetch,
    /// The key is not registered: a miss.
    Unknown,
}

/// The decision table (see the module docs). `age_ms` is the copy's age.
pub fn decide(policy: &Policy, answer: &CheckAnswer, age_ms: u64) -> Decision {
    let age = Duration::from_millis(age_ms);
    let too_old = policy.max_age.is_some_and(|max| age > max);
    match answer.freshness {
        Freshness::Unknown => Decision::Unknown,
        Freshness::Stale => {
            let critical = answer.critical_since && !policy.allow_stale_on_critical;
            if critical || too_old {
                Decision::Refetch
            } else if age <= policy.stale_while_revalidate
                && !policy.stale_while_revalidate.is_zero()
            {
                Decision::Revalidate
            } else {
                Decision::Refetch
            }
        }
        Freshness::Fresh => {
            if too_old {
                Decision::Refetch
            } else if answer.soft_purged || policy.revalidate_after.is_some_and(|soft| age > soft) {
                Decision::Revalidate
            } else {
                Decision::Fresh
            }
        }
    }
}

/// The namespace of a key: the part before its first `:` (the whole key when
/// it has none).
pub fn namespace(key: &str) -> &str {
    // A byte scan: it runs for every key of every check, namespaces are
    // short, and `:` is ASCII, so the cut falls on a char boundary.
    match key.bytes().position(|b| b == b':') {
        Some(end) => &key[..end],
        None => key,
    }
}

/// The default policy and the policies of named namespaces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    /// Applies to every namespace without its own.
    pub default: Policy,
    /// By namespace.
    pub namespaces: BTreeMap<String, Policy>,
}

impl Policies {
    /// The policy for `key`'s namespace.
    pub fn for_key(&self, key: &str) -> &Policy {
        self.for_namespace(namespace(key))
    }

    /// The policy for `namespace` (the default when it has none of its own).
    pub fn for_namespace(&self, namespace: &str) -> &Policy {
        self.namespaces.get(namespace).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(freshness: Freshness, critical_since: bool, soft_purged: bool) -> CheckAnswer {
        CheckAnswer {
            freshness,
            version: 9,
            critical: critical_since,
            critical_since,
            soft_purged,
            last_change_seq: 0,
        }
    }

    /// The article's example: serve if age < 5s, revalidate async if age >
    /// 2s, force an origin read if the critical bit changed.
    fn article() -> Policy {
        Policy {
            max_age: Some(Duration::from_secs(5)),
            revalidate_after: Some(Duration::from_secs(2)),
            stale_while_revalidate: Duration::from_secs(5),
            allow_stale_on_critical: false,
            check_sample_rate: 1.0,
        }
    }

    #[test]
    fn every_row_and_boundary_of_the_table() {
        use Decision::*;
        use Freshness::{Fresh as Cur, Stale, Unknown as Unk};
        let p = article();
        let lenient = Policy {
            allow_stale_on_critical: true,
            ..article()
        };
        let no_swr = Policy {
            stale_while_revalidate: Duration::ZERO,
            ..article()
        };
        // (policy, freshness, critical since, soft purged, age ms, expected)
        let rows: &[(&Policy, Freshness, bool, bool, u64, Decision)] = &[
            (&p, Unk, false, false, 0, Unknown),
            (&p, Unk, true, true, 99_999, Unknown),
            // current
            (&p, Cur, false, false, 0, Fresh),
            (&p, Cur, false, false, 2_000, Fresh),
            (&p, Cur, false, false, 2_001, Revalidate),
            (&p, Cur, false, false, 5_000, Revalidate),
            (&p, Cur, false, false, 5_001, Refetch),
            (&p, Cur, false, true, 0, Revalidate),
            (&p, Cur, false, true, 5_001, Refetch),
            // stale
            (&p, Stale, true, false, 0, Refetch),
            (&lenient, Stale, true, false, 0, Revalidate),
            (&lenient, Stale, true, false, 5_001, Refetch),
            (&p, Stale, false, false, 0, Revalidate),
            (&p, Stale, false, false, 5_000, Revalidate),
            (&p, Stale, false, false, 5_001, Refetch),
            (&no_swr, Stale, false, false, 0, Refetch),
        ];
        for (i, &(policy, f, crit, soft, age, want)) in rows.iter().enumerate() {
            let got = decide(policy, &answer(f, crit, soft), age);
            assert_eq!(
                got, want,
                "row {i}: {f:?} critical={crit} soft={soft} age={age}"
            );
        }
    }

    #[test]
    fn the_default_policy_is_fresh_or_refetch() {
        let p = Policy::default();
        for age in [0, 1, u64::MAX / 2] {
            let fresh = answer(Freshness::Fresh, false, false);
            assert_eq!(decide(&p, &fresh, age), Decision::Fresh);
            let stale = answer(Freshness::Stale, false, false);
            assert_eq!(decide(&p, &stale, age), Decision::Refetch);
        }
    }

    #[test]
    fn validation_names_the_field() {
        let bad = Policy {
            check_sample_rate: 1.5,
            ..Policy::default()
        };
        assert!(bad
            .validate("policy")
            .unwrap_err()
            .to_string()
            .contains("policy.check_sample_rate"));
        let inverted = Policy {
            max_age: Some(Duration::from_secs(1)),
            revalidate_after: Some(Duration::from_secs(2)),
            ..Policy::default()
        };
        assert!(inverted
            .validate("policy")
            .unwrap_err()
            .to_string()
            .contains("policy.revalidate_after"));
        assert!(article().validate("policy").is_ok());
    }

    #[test]
    fn namespaces_pick_their_policy() {
        let mut policies = Policies::default();
        policies.namespaces.insert("feed".into(), article());
        assert_eq!(namespace("feed:user:1"), "feed");
        assert_eq!(namespace("plain"), "plain");
        assert_eq!(namespace(":leading"), "");
        assert_eq!(namespace("trailing:"), "trailing");
        assert_eq!(namespace(""), "");
        assert_eq!(namespace("épée:1"), "épée");
        assert_eq!(policies.for_key("feed:user:1"), &article());
        assert_eq!(policies.for_key("posts:1"), &Policy::default());
        assert_eq!(policies.for_namespace("feed"), &article());
        assert_eq!(policies.for_namespace("posts"), &Policy::default());
    }
}
