//! Constructors and `with_*` setters for the request messages, so that calls
//! read as what they do:
//!
//! ```
//! use std::time::Duration;
//! use freshd_client::pb::{Change, CheckRequest, FillRequest, PublishRequest};
//!
//! let publish = PublishRequest::new([Change::new("posts:77").with_critical(true)]);
//! let fill = FillRequest::new("feed:1", ["posts:77", "follows:1"]).with_ttl(Duration::from_secs(60));
//! let check = CheckRequest::new("feed:1", 17).with_age(Duration::from_secs(2));
//! # let _ = (publish, fill, check);
//! ```
//!
//! Every field stays public: a struct literal with `..Default::default()`
//! works as well.

use std::time::Duration;

use crate::pb::{
    Change, CheckBatchRequest, CheckItem, CheckRequest, FillRequest, FreshnessPolicy, LeaseRequest,
    PublishRequest, PurgeRequest, ResumeToken, WatchStart,
};

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Change {
    /// A change of `key`: not critical, no external version, event time now.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            ..Default::default()
        }
    }

    /// Marks the change critical: caches must not serve a copy from before it.
    pub fn with_critical(mut self, critical: bool) -> Self {
        self.critical = critical;
        self
    }

    /// The source's monotonic version of the change (a database LSN, say).
    pub fn with_external_version(mut self, version: u64) -> Self {
        self.external_version = Some(version);
        self
    }

    /// When the producer saw the change, in Unix milliseconds.
    pub fn with_event_time_unix_ms(mut self, unix_ms: u64) -> Self {
        self.event_time_unix_ms = unix_ms;
        self
    }
}

impl From<&str> for Change {
    fn from(key: &str) -> Self {
        Change::new(key)
    }
}

impl From<String> for Change {
    fn from(key: String) -> Self {
        Change::new(key)
    }
}

impl PublishRequest {
    /// A publish of `changes` (keys convert into plain changes).
    pub fn new<C: Into<Change>>(changes: impl IntoIterator<Item = C>) -> Self {
        Self {
            changes: changes.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Names the publisher, for `no_loop` Watch streams of the same id.
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }
}

impl From<Change> for PublishRequest {
    fn from(change: Change) -> Self {
        PublishRequest::new([change])
    }
}

impl From<Vec<Change>> for PublishRequest {
    fn from(changes: Vec<Change>) -> Self {
        PublishRequest::new(changes)
    }
}

impl FillRequest {
    /// A fill of `key` with its dependency set; the server's default TTL,
    /// no observed seq.
    pub fn new<D: Into<String>>(
        key: impl Into<String>,
        dependencies: impl IntoIterator<Item = D>,
    ) -> Self {
        Self {
            key: key.into(),
            dependencies: dependencies.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// How long the registration lives (millisecond precision).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl_ms = millis(ttl);
        self
    }

    /// The seq (and its epoch, 0 for none) the caller got before it read the
    /// origin: the fill is refused if anything changed after it.
    pub fn with_observed(mut self, seq: u64, epoch: u64) -> Self {
        self.observed_seq = seq;
        self.epoch = epoch;
        self
    }

    /// The token of the caller's lease; the fill releases it.
    pub fn with_lease_token(mut self, token: u64) -> Self {
        self.lease_token = token;
        self
    }

    /// The caller's client id, as on its Watch stream.
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }
}

impl CheckRequest {
    /// A check of the copy of `key` at `version` (0: no copy).
    pub fn new(key: impl Into<String>, version: u64) -> Self {
        Self {
            key: key.into(),
            version,
            ..Default::default()
        }
    }

    /// How long ago the copy was read from the origin.
    pub fn with_age(mut self, age: Duration) -> Self {
        self.age_ms = millis(age);
        self
    }

    /// The epoch the version came from.
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// Read your writes: wait until the server applied this seq.
    pub fn with_min_seq(mut self, seq: u64) -> Self {
        self.min_seq = seq;
        self
    }

    /// The API endpoint serving the copy (a metrics label).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into();
        self
    }

    /// Whether the copy was already served before this check.
    pub fn with_served(mut self, served: bool) -> Self {
        self.served = served;
        self
    }

    /// The caller's client id, as on its Watch stream.
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }
}

impl From<&str> for CheckRequest {
    /// A check of a key the caller holds no copy of: it answers UNKNOWN or
    /// STALE, with the current version and the seq to fill with.
    fn from(key: &str) -> Self {
        CheckRequest::new(key, 0)
    }
}

impl CheckItem {
    /// One copy to check: `key` at `version`.
    pub fn new(key: impl Into<String>, version: u64) -> Self {
        Self {
            key: key.into(),
            version,
            ..Default::default()
        }
    }

    /// How long ago the copy was read from the origin.
    pub fn with_age(mut self, age: Duration) -> Self {
        self.age_ms = millis(age);
        self
    }

    /// Whether the copy was already served before this check.
    pub fn with_served(mut self, served: bool) -> Self {
        self.served = served;
        self
    }
}

impl CheckBatchRequest {
    /// A batch of checks answered from one consistent state.
    pub fn new(items: impl IntoIterator<Item = CheckItem>) -> Self {
        Self {
            items: items.into_iter().collect(),
            ..Default::default()
        }
    }

    /// The epoch the versions came from.
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// Read your writes: wait until the server applied this seq.
    pub fn with_min_seq(mut self, seq: u64) -> Self {
        self.min_seq = seq;
        self
    }

    /// The API endpoint serving the copies (a metrics label).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into();
        self
    }

    /// The caller's client id, as on its Watch stream.
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }
}

impl LeaseRequest {
    /// The fill lease of `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            ..Default::default()
        }
    }

    /// Read your writes: wait until the server applied this seq.
    pub fn with_min_seq(mut self, seq: u64) -> Self {
        self.min_seq = seq;
        self
    }
}

impl From<&str> for LeaseRequest {
    fn from(key: &str) -> Self {
        LeaseRequest::new(key)
    }
}

impl From<String> for LeaseRequest {
    fn from(key: String) -> Self {
        LeaseRequest::new(key)
    }
}

impl PurgeRequest {
    /// A soft purge of every key under `prefix` (see also
    /// [`PurgeRequest::with_dry_run`]).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            ..Default::default()
        }
    }

    /// Only report what the purge would do.
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// A hard purge: copies answer REFETCH at once and notices go out.
    pub fn with_hard(mut self, hard: bool) -> Self {
        self.hard = hard;
        self
    }

    /// Go ahead although more than `max_purge_keys` keys are affected.
    pub fn with_confirm(mut self, confirm: bool) -> Self {
        self.confirm = confirm;
        self
    }

    /// A soft purge's spread (millisecond precision; zero: the server's).
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter_ms = millis(jitter);
        self
    }
}

impl FreshnessPolicy {
    /// Hard limit on a copy's age.
    pub fn with_max_age(mut self, age: Duration) -> Self {
        self.max_age_ms = millis(age);
        self
    }

    /// Age after which a current copy answers REVALIDATE.
    pub fn with_revalidate_after(mut self, age: Duration) -> Self {
        self.revalidate_after_ms = millis(age);
        self
    }

    /// Age up to which a stale (not critical) copy answers REVALIDATE.
    pub fn with_stale_while_revalidate(mut self, age: Duration) -> Self {
        self.stale_while_revalidate_ms = millis(age);
        self
    }

    /// Let critical changes be served stale like any other.
    pub fn with_allow_stale_on_critical(mut self, allow: bool) -> Self {
        self.allow_stale_on_critical = allow;
        self
    }

    /// The share of cache hits clients should check, 0 to 1.
    pub fn with_check_sample_rate(mut self, rate: f64) -> Self {
        self.check_sample_rate = Some(rate);
        self
    }
}

impl WatchStart {
    /// A new stream from now, with no filters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the client (for `no_loop`, Stats and the freshness metrics).
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// No notices caused by publishes carrying the same client id.
    pub fn with_no_loop(mut self, no_loop: bool) -> Self {
        self.no_loop = no_loop;
        self
    }

    /// Resume after `seq` of `epoch`: the last notice batch or progress applied.
    pub fn with_resume(mut self, epoch: u64, seq: u64) -> Self {
        self.resume = Some(ResumeToken { epoch, seq });
        self
    }

    /// Exact keys to track from the start.
    pub fn with_track<K: Into<String>>(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.track.extend(keys.into_iter().map(Into::into));
        self
    }

    /// Prefixes to watch from the start (the empty prefix is every key).
    pub fn with_subscribe<P: Into<String>>(
        mut self,
        prefixes: impl IntoIterator<Item = P>,
    ) -> Self {
        self.subscribe.extend(prefixes.into_iter().map(Into::into));
        self
    }

    /// Answer a later `track` or `subscribe` the server refuses with
    /// [`crate::WatchEvent::Refused`], keeping the stream; without it such a
    /// request ends the stream with the error.
    pub fn with_refusals_in_band(mut self, in_band: bool) -> Self {
        self.refusals_in_band = in_band;
        self
    }
}
