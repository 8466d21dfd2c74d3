//! Request validation and conversion: every rule and limit a request must
//! meet, checked before anything is changed, with errors that name the field,
//! the size and the limit.
//!
//! Defined behaviour for edge cases:
//! - Empty keys are refused, wherever a key appears.
//! - Keys are any UTF-8 (the protobuf decoder refuses anything else, with
//!   `INVALID_ARGUMENT`), compared byte for byte.
//! - A Publish may name a key more than once (see the proto); a Fill's
//!   duplicate dependencies collapse into one edge, and a key listed as its
//!   own dependency is ignored; CheckBatch answers duplicate items
//!   independently.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::pb;
use crate::policy::Policy;
use crate::store::{FillSpec, PublishChange, PurgeSpec, StoreConfig};

/// Request limits. Each is a setting (see `Config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Most dependencies per fill, counted before duplicates collapse.
    pub max_dependencies: usize,
    /// Most items per CheckBatch and changes per Publish.
    pub max_batch_items: usize,
    /// Longest read-your-writes wait for a `min_seq`.
    pub max_wait_for_seq: Duration,
    /// Purges affecting more keys need `confirm`.
    pub max_purge_keys: u64,
    /// Most purges (not dry runs) per minute.
    pub purges_per_minute: u64,
    /// A soft purge's default spread.
    pub purge_jitter: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_dependencies: 1024,
            max_batch_items: 10_000,
            max_wait_for_seq: Duration::from_secs(1),
            max_purge_keys: 10_000,
            purges_per_minute: 10,
            purge_jitter: Duration::from_secs(5),
        }
    }
}

impl Limits {
    /// Checks one key; `field` names it in the error.
    pub fn key(&self, field: impl FnOnce() -> String, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(Error::invalid(format!("{} must not be empty", field())));
        }
        if key.len() > self.max_key_bytes {
            return Err(Error::invalid(format!(
                "{} is {} bytes; the limit is {} (max_key_bytes)",
                field(),
                key.len(),
                self.max_key_bytes
            )));
        }
        Ok(())
    }

    /// Checks the length of a batch field.
    pub fn batch(&self, field: &str, len: usize) -> Result<()> {
        if len > self.max_batch_items {
            return Err(Error::invalid(format!(
                "{field} has {len} items; the limit is {} (max_batch_items)",
                self.max_batch_items
            )));
        }
        Ok(())
    }

    /// Validates a Publish and converts its changes.
    pub fn publish(&self, request: pb::PublishRequest) -> Result<Vec<PublishChange>> {
        if request.changes.is_empty() {
            return Err(Error::invalid(
                "changes must not be empty: name at least one changed key",
            ));
        }
        self.batch("changes", request.changes.len())?;
        request
            .changes
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                self.key(|| format!("changes[{i}].key"), &c.key)?;
                Ok(PublishChange {
                    key: c.key,
                    external_version: c.external_version,
                    critical: c.critical,
                    event_time_ms: c.event_time_unix_ms,
                })
            })
            .collect()
    }

    /// Validates a Fill and converts it: dependencies sorted and unique,
    /// TTL defaulted and capped.
    pub fn fill(&self, request: pb::FillRequest, store: &StoreConfig) -> Result<FillSpec> {
        self.key(|| "key".to_owned(), &request.key)?;
        if request.dependencies.len() > self.max_dependencies {
            return Err(Error::invalid(format!(
                "dependencies has {} items; the limit is {} (max_dependencies)",
                request.dependencies.len(),
                self.max_dependencies
            )));
        }
        for (i, dep) in request.dependencies.iter().enumerate() {
            self.key(|| format!("dependencies[{i}]"), dep)?;
        }
        let mut dependencies = request.dependencies;
        dependencies.retain(|d| *d != request.key);
        dependencies.sort_unstable();
        dependencies.dedup();
        let max_ttl = store.max_ttl.as_millis() as u64;
        let ttl_ms = match request.ttl_ms {
            0 => store.default_ttl.as_millis() as u64,
            ttl => ttl.min(max_ttl),
        };
        Ok(FillSpec {
            key: request.key,
            dependencies,
            ttl_ms,
            observed_seq: request.observed_seq,
        })
    }
}

impl Limits {
    /// Validates a Purge and converts it.
    pub fn purge(&self, request: &pb::PurgeRequest) -> Result<PurgeSpec> {
        if request.prefix.len() > self.max_key_bytes {
            return Err(Error::invalid(format!(
                "prefix is {} bytes; the limit is {} (max_key_bytes)",
                request.prefix.len(),
                self.max_key_bytes
            )));
        }
        Ok(PurgeSpec {
            prefix: request.prefix.clone(),
            hard: request.hard,
            jitter_ms: match request.jitter_ms {
                0 => self.purge_jitter.as_millis() as u64,
                j => j,
            },
            dry_run: request.dry_run,
            confirm: request.confirm,
            max_keys: self.max_purge_keys,
        })
    }

    /// Checks a namespace name: no `:`, within the key limit.
    pub fn namespace(&self, field: &str, namespace: &str) -> Result<()> {
        if namespace.contains(':') {
            return Err(Error::invalid(format!(
                "{field} {namespace:?} contains ':'; a namespace is the part of a key before its first ':'"
            )));
        }
        if namespace.len() > self.max_key_bytes {
            return Err(Error::invalid(format!(
                "{field} is {} bytes; the limit is {} (max_key_bytes)",
                namespace.len(),
                self.max_key_bytes
            )));
        }
        Ok(())
    }
}

/// Converts a protobuf policy, checking it.
pub fn policy(p: &pb::FreshnessPolicy) -> Result<Policy> {
    let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
    let policy = Policy {
        max_age: ms(p.max_age_ms),
        revalidate_after: ms(p.revalidate_after_ms),
        stale_while_revalidate: Duration::from_millis(p.stale_while_revalidate_ms),
        allow_stale_on_critical: p.allow_stale_on_critical,
        check_sample_rate: p.check_sample_rate.unwrap_or(1.0),
    };
    policy.validate("policy")?;
    Ok(policy)
}

/// Converts a policy to protobuf.
pub fn policy_to_pb(p: &Policy) -> pb::FreshnessPolicy {
    let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis() as u64);
    pb::FreshnessPolicy {
        max_age_ms: ms(p.max_age),
        revalidate_after_ms: ms(p.revalidate_after),
        stale_while_revalidate_ms: p.stale_while_revalidate.as_millis() as u64,
        allow_stale_on_critical: p.allow_stale_on_critical,
        check_sample_rate: Some(p.check_sample_rate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_key_bytes: 8,
            max_dependencies: 3,
            max_batch_items: 2,
            ..Limits::default()
        }
    }

    #[test]
    fn keys_must_be_non_empty_and_within_the_limit() {
        let l = limits();
        assert!(l.key(|| "key".into(), "12345678").is_ok());
        let e = l.key(|| "key".into(), "").unwrap_err().to_string();
        assert_eq!(e, "key must not be empty");
        let e = l
            .key(|| "changes[1].key".into(), "123456789")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "changes[1].key is 9 bytes; the limit is 8 (max_key_bytes)"
        );
    }

    #[test]
    fn publish_needs_changes_within_the_batch_limit() {
        let l = limits();
        let e = l
            .publish(pb::PublishRequest {
                changes: vec![],
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().starts_with("changes must not be empty"));
        let change = |k: &str| pb::Change {
            key: k.into(),
            ..Default::default()
        };
        let e = l
            .publish(pb::PublishRequest {
                changes: vec![change("a"), change("b"), change("c")],
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "changes has 3 items; the limit is 2 (max_batch_items)"
        );
        let e = l
            .publish(pb::PublishRequest {
                changes: vec![change("a"), change("")],
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "changes[1].key must not be empty");
        let ok = l
            .publish(pb::PublishRequest {
                changes: vec![pb::Change {
                    key: "a".into(),
                    external_version: Some(7),
                    critical: true,
                    event_time_unix_ms: 99,
                }],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            ok,
            vec![PublishChange {
                key: "a".into(),
                external_version: Some(7),
                critical: true,
                event_time_ms: 99
            }]
        );
    }

    #[test]
    fn fill_normalises_dependencies_and_ttl() {
        let l = Limits::default();
        let store = StoreConfig::default();
        let spec = l
            .fill(
                pb::FillRequest {
                    key: "k".into(),
                    dependencies: vec!["b".into(), "k".into(), "a".into(), "b".into()],
                    ttl_ms: 0,
                    observed_seq: 4,
                    epoch: 0,
                    lease_token: 0,
                    client_id: String::new(),
                },
                &store,
            )
            .unwrap();
        assert_eq!(spec.dependencies, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(spec.ttl_ms, 300_000);
        assert_eq!(spec.observed_seq, 4);
        let capped = l
            .fill(
                pb::FillRequest {
                    key: "k".into(),
                    ttl_ms: u64::MAX,
                    ..Default::default()
                },
                &store,
            )
            .unwrap();
        assert_eq!(capped.ttl_ms, 86_400_000);
    }

    #[test]
    fn fill_limits_dependencies_and_names_the_bad_one() {
        let l = limits();
        let store = StoreConfig::default();
        let e = l
            .fill(
                pb::FillRequest {
                    key: "k".into(),
                    dependencies: vec!["a".into(); 4],
                    ..Default::default()
                },
                &store,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "dependencies has 4 items; the limit is 3 (max_dependencies)"
        );
        let e = l
            .fill(
                pb::FillRequest {
                    key: "k".into(),
                    dependencies: vec!["a".into(), "much too long".into()],
                    ..Default::default()
                },
                &store,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "dependencies[1] is 13 bytes; the limit is 8 (max_key_bytes)"
        );
        let e = l.fill(pb::FillRequest::default(), &store).unwrap_err();
        assert_eq!(e.to_string(), "key must not be empty");
    }
}
