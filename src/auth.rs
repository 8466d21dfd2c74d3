//! Authentication and authorisation: bearer tokens, principals, per-namespace
//! scopes and per-principal quotas.
//!
//! A request carries `authorization: Bearer <token>`. The server keeps only
//! the SHA-256 of each token (tokens are long random strings, so a fast hash
//! is the right one: there is nothing to brute-force). A token names a
//! [`Principal`], which holds [`Scope`]s per namespace (`"*"` for every
//! namespace) and [`Quotas`].
//!
//! With no principal configured, authentication is off and every request is
//! allowed; that is the default, for loopback use. See `docs/security.md`.
//!
//! The principals can be replaced while the server runs ([`Auth::reload`]):
//! a principal whose settings are unchanged carries on as it was, and the
//! Watch streams of one removed or changed end with UNAUTHENTICATED.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::metrics::Metrics;
use crate::policy::namespace;

/// What a principal may do in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Check, CheckBatch, Inspect; naming a key as a dependency in a Fill.
    Check,
    /// Watch: track keys and subscribe to prefixes; see their notices.
    Watch,
    /// Fill and Lease.
    Fill,
    /// Publish.
    Publish,
    /// Purge.
    Purge,
    /// Policies (Get/Set/Delete/ListPolicies); Stats needs it on `"*"`.
    Admin,
}

impl Scope {
    /// Every scope, in the order the docs list them.
    pub const ALL: [Scope; 6] = [
        Scope::Check,
        Scope::Watch,
        Scope::Fill,
        Scope::Publish,
        Scope::Purge,
        Scope::Admin,
    ];

    /// The scope's name in the configuration and in errors.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Check => "check",
            Scope::Watch => "watch",
            Scope::Fill => "fill",
            Scope::Publish => "publish",
            Scope::Purge => "purge",
            Scope::Admin => "admin",
        }
    }

    /// The scope called `name`.
    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.name() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of scopes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// Adds `scope`.
    pub fn insert(&mut self, scope: Scope) {
        self.0 |= scope.bit();
    }

    /// Whether `scope` is in the set.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

/// Limits on what one principal may hold or do; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Connections that carried at least one of its requests, open at once.
    pub connections: Option<u64>,
    /// Watch streams open at once.
    pub streams: Option<u64>,
    /// Keys tracked plus prefixes watched, over all its streams.
    pub tracked_keys: Option<u64>,
    /// Published changes per second (a token bucket holding one second).
    pub publishes_per_second: Option<u64>,
    /// Keys its publishes and purges may invalidate per second. A request is
    /// admitted while the budget is not in debt and then charged what it
    /// invalidated, so one large publish can run the budget into debt and
    /// hold the next ones back until it refills.
    pub fanout_per_second: Option<u64>,
}

/// A principal as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalConfig {
    /// Its name, in logs, errors and metrics.
    pub name: String,
    /// SHA-256 of its token.
    pub token_sha256: [u8; 32],
    /// When the token stops working.
    pub expires: Option<SystemTime>,
    /// Scopes by namespace; `"*"` applies to every namespace.
    pub scopes: Vec<(String, Scopes)>,
    /// Its quotas.
    pub quotas: Quotas,
}

/// Authentication settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// The principals; none turns authentication off.
    pub principals: Vec<PrincipalConfig>,
    /// Whether `grpc.health.v1` needs a token (default: no).
    pub health_requires_token: bool,
    /// Whether reflection needs a token (default: no).
    pub reflection_requires_token: bool,
}

impl AuthConfig {
    /// Whether requests must carry a token.
    pub fn enabled(&self) -> bool {
        !self.principals.is_empty()
    }
}

/// A token bucket that may run into debt.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        Self {
            tokens: rate as f64,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, rate: u64) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * rate as f64).min(rate as f64);
    }
}

/// What a principal holds right now, for its quotas.
#[derive(Debug)]
pub struct Usage {
    connections: AtomicU64,
    streams: AtomicU64,
    tracked: AtomicU64,
    publishes: Mutex<Bucket>,
    fanout: Mutex<Bucket>,
}

/// An authenticated caller.
#[derive(Debug)]
pub struct Principal {
    /// Its name.
    pub name: Arc<str>,
    expires: Option<SystemTime>,
    all: Scopes,
    namespaces: HashMap<Box<str>, Scopes>,
    /// Its quotas.
    pub quotas: Quotas,
    /// What it holds. Shared with the principal of the same name that
    /// replaces it in a reload: what was counted against this one is given
    /// back there when it closes.
    usage: Arc<Usage>,
    /// What it was made from, to tell a reload that changes it.
    config: PrincipalConfig,
    /// A reload removed or changed it.
    revoked: AtomicBool,
    revocation: tokio::sync::Notify,
}

/// A quota was exceeded; the message names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    /// The quota's setting name.
    pub quota: &'static str,
    /// The whole message.
    pub message: String,
}

impl From<QuotaExceeded> for Status {
    fn from(e: QuotaExceeded) -> Self {
        Status::resource_exhausted(e.message)
    }
}

impl Principal {
    /// A principal from its configuration.
    pub fn new(config: &PrincipalConfig) -> Self {
        Self::with_usage(
            config,
            Arc::new(Usage {
                connections: AtomicU64::new(0),
                streams: AtomicU64::new(0),
                tracked: AtomicU64::new(0),
                publishes: Mutex::new(Bucket::new(config.quotas.publishes_per_second.unwrap_or(0))),
                fanout: Mutex::new(Bucket::new(config.quotas.fanout_per_second.unwrap_or(0))),
            }),
        )
    }

    /// A principal from its configuration, counting into `usage`.
    fn with_usage(config: &PrincipalConfig, usage: Arc<Usage>) -> Self {
        let mut all = Scopes::default();
        let mut namespaces = HashMap::new();
        for (ns, scopes) in &config.scopes {
            if ns == "*" {
                all = *scopes;
            } else {
                namespaces.insert(ns.as_str().into(), *scopes);
            }
        }
        Self {
            name: Arc::from(config.name.as_str()),
            expires: config.expires,
            all,
            namespaces,
            quotas: config.quotas,
            usage,
            config: config.clone(),
            revoked: AtomicBool::new(false),
            revocation: tokio::sync::Notify::new(),
        }
    }

    /// Whether it counts what it holds where `other` does: the same
    /// principal, or one a reload changed into the other.
    fn counts_as(&self, other: &Principal) -> bool {
        Arc::ptr_eq(&self.usage, &other.usage)
    }

    /// Whether a reload removed or changed it: the streams opened under it
    /// end (requests authenticate against the principals now configured).
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Marks it removed or changed by a reload, and wakes every stream
    /// waiting in [`Principal::revoked`].
    fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        self.revocation.notify_waiters();
    }

    /// Completes once a reload has removed or changed it.
    pub async fn revoked(&self) {
        loop {
            let notified = self.revocation.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a revocation between
            // the two still wakes it.
            notified.as_mut().enable();
            if self.is_revoked() {
                return;
            }
            notified.await;
        }
    }

    /// The end of a stream whose principal a reload removed or changed.
    pub fn revoked_status(&self) -> Status {
        Status::unauthenticated(format!(
            "the settings of principal {:?} changed in a configuration reload: \
             reconnect with a token that is configured, and resume from the last seq",
            self.name
        ))
    }

    /// Whether it holds `scope` in `namespace` (directly or through `"*"`).
    pub fn allows(&self, scope: Scope, namespace: &str) -> bool {
        self.all.contains(scope)
            || self
                .namespaces
                .get(namespace)
                .is_some_and(|s| s.contains(scope))
    }

    /// Whether it holds `scope` in at least one namespace.
    pub fn allows_somewhere(&self, scope: Scope) -> bool {
        self.all.contains(scope) || self.namespaces.values().any(|s| s.contains(scope))
    }

    /// Whether it holds `scope` in every namespace (`"*"`).
    pub fn allows_everywhere(&self, scope: Scope) -> bool {
        self.all.contains(scope)
    }

    /// Whether it holds `scope` in the namespace of `key`.
    pub fn allows_key(&self, scope: Scope, key: &str) -> bool {
        self.allows(scope, namespace(key))
    }

    /// PERMISSION_DENIED unless it holds `scope` in `namespace`.
    pub fn require(&self, scope: Scope, namespace: &str) -> Result<(), Status> {
        if self.allows(scope, namespace) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "principal {:?} lacks scope {:?} in namespace {namespace:?}",
            self.name,
            scope.name()
        )))
    }

    /// PERMISSION_DENIED unless it holds `scope` in the namespace of `key`.
    pub fn require_key(&self, scope: Scope, key: &str) -> Result<(), Status> {
        self.require(scope, namespace(key))
    }

    /// PERMISSION_DENIED unless it holds `scope` in every namespace.
    pub fn require_everywhere(&self, scope: Scope, what: &str) -> Result<(), Status> {
        if self.allows_everywhere(scope) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "principal {:?} lacks scope {:?} in namespace \"*\" (every namespace), which {what} needs",
            self.name,
            scope.name()
        )))
    }

    /// PERMISSION_DENIED unless it holds `scope` wherever `prefix` may reach:
    /// the prefix's namespace when the prefix names one (`"feed:"` or
    /// longer), else every namespace.
    pub fn require_prefix(&self, scope: Scope, prefix: &str) -> Result<(), Status> {
        match prefix.split_once(':') {
            Some((ns, _)) => self.require(scope, ns),
            None => self.require_everywhere(
                scope,
                &format!("prefix {prefix:?} (it ends before the first ':', so it may match several namespaces)"),
            ),
        }
    }

    fn exceeded(&self, quota: &'static str, message: String) -> QuotaExceeded {
        QuotaExceeded {
            quota,
            message: format!("principal {:?}: {message} (quota {quota})", self.name),
        }
    }

    /// Counts a connection, unless that would pass the `connections` quota.
    fn open_connection(&self) -> Result<(), QuotaExceeded> {
        reserve(&self.usage.connections, 1, self.quotas.connections).map_err(|(now, limit)| {
            self.exceeded(
                "connections",
                format!("{now} connections open; the limit is {limit}"),
            )
        })
    }

    fn close_connection(&self) {
        self.usage.connections.fetch_sub(1, Ordering::AcqRel);
    }

    /// Counts a Watch stream, unless that would pass the `streams` quota.
    pub fn open_stream(&self) -> Result<(), QuotaExceeded> {
        reserve(&self.usage.streams, 1, self.quotas.streams).map_err(|(now, limit)| {
            self.exceeded(
                "streams",
                format!("{now} Watch streams open; the limit is {limit}"),
            )
        })
    }

    /// Uncounts a Watch stream.
    pub fn close_stream(&self) {
        self.usage.streams.fetch_sub(1, Ordering::AcqRel);
    }

    /// Counts `n` more tracked keys or prefixes, unless that would pass the
    /// `tracked_keys` quota.
    pub fn track(&self, n: u64) -> Result<(), QuotaExceeded> {
        reserve(&self.usage.tracked, n, self.quotas.tracked_keys).map_err(|(now, limit)| {
            self.exceeded(
                "tracked_keys",
                format!(
                    "{now} keys and prefixes tracked over all its streams, {n} more asked; the limit is {limit}"
                ),
            )
        })
    }

    /// Uncounts `n` tracked keys or prefixes.
    pub fn untrack(&self, n: u64) {
        self.usage.tracked.fetch_sub(n, Ordering::AcqRel);
    }

    /// Takes `changes` from the publish-rate bucket, or refuses.
    pub fn publish(&self, changes: u64) -> Result<(), QuotaExceeded> {
        let Some(rate) = self.quotas.publishes_per_second else {
            return Ok(());
        };
        let mut bucket = self.usage.publishes.lock();
        bucket.refill(rate);
        if changes as f64 > bucket.tokens {
            return Err(self.exceeded(
                "publishes_per_second",
                format!(
                    "publishing {changes} changes would pass {rate} changes per second; retry after {} ms",
                    retry_ms(changes as f64 - bucket.tokens, rate)
                ),
            ));
        }
        bucket.tokens -= changes as f64;
        Ok(())
    }

    /// Refuses while the fan-out budget is in debt.
    pub fn admit_fanout(&self) -> Result<(), QuotaExceeded> {
        let Some(rate) = self.quotas.fanout_per_second else {
            return Ok(());
        };
        let mut bucket = self.usage.fanout.lock();
        bucket.refill(rate);
        if bucket.tokens < 0.0 {
            return Err(self.exceeded(
                "fanout_per_second",
                format!(
                    "its publishes and purges invalidated more than {rate} keys per second; retry after {} ms",
                    retry_ms(-bucket.tokens, rate)
                ),
            ));
        }
        Ok(())
    }

    /// Charges `invalidated` keys to the fan-out budget.
    pub fn charge_fanout(&self, invalidated: u64) {
        if let Some(rate) = self.quotas.fanout_per_second {
            let mut bucket = self.usage.fanout.lock();
            bucket.refill(rate);
            bucket.tokens -= invalidated as f64;
        }
    }

    /// Whether the token has expired.
    fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }

    /// When the token stops working, if it does.
    pub fn expires(&self) -> Option<SystemTime> {
        self.expires
    }

    /// The refusal of a request, or the end of a stream, once the token has
    /// expired.
    pub fn expired_status(&self) -> Status {
        let at = self
            .expires
            .map(|e| humantime::format_rfc3339_seconds(e).to_string())
            .unwrap_or_default();
        Status::unauthenticated(format!(
            "the token of principal {:?} expired at {at}",
            self.name
        ))
    }
}

fn retry_ms(missing: f64, rate: u64) -> u64 {
    ((missing / rate.max(1) as f64) * 1000.0).ceil().max(1.0) as u64
}

/// Adds `n` to `counter` unless the sum would pass `limit`; on refusal
/// returns the current count and the limit.
fn reserve(counter: &AtomicU64, n: u64, limit: Option<u64>) -> Result<(), (u64, u64)> {
    let Some(limit) = limit else {
        counter.fetch_add(n, Ordering::AcqRel);
        return Ok(());
    };
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
            (now + n <= limit).then_some(now + n)
        })
        .map(|_| ())
        .map_err(|now| (now, limit))
}

/// The client id a request of `owner` acts under: `principal/client_id`
/// when authenticated (so that no principal can pass for another's client,
/// to silence its notices through no-loop, say), as given otherwise. An
/// empty id stays empty.
pub fn client_id(owner: Option<&Arc<Principal>>, client_id: String) -> String {
    match owner {
        Some(p) if !client_id.is_empty() => format!("{}/{client_id}", p.name),
        _ => client_id,
    }
}

/// The hex SHA-256 of a token, as the configuration stores it.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// A new random token: 32 random bytes, URL-safe base64, prefixed `fd_`.
pub fn new_token() -> String {
    use base64_url as b64;
    let bytes: [u8; 32] = rand::random();
    format!("fd_{}", b64::encode(&bytes))
}

/// Minimal unpadded URL-safe base64, enough for tokens.
mod base64_url {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits.
pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The authenticator: tokens to principals.
#[derive(Debug, Default)]
pub struct Auth {
    /// Replaced whole by a reload; read under the lock only to look a
    /// token up.
    by_hash: RwLock<Arc<HashMap<[u8; 32], Arc<Principal>>>>,
    /// Fixed at startup: a reload cannot turn authentication on or off.
    enabled: bool,
    health_requires_token: bool,
    reflection_requires_token: bool,
}

/// What a reload changed, by principal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Unchanged: they carry on as they were.
    pub kept: usize,
    /// Changed settings (token, expiry, scopes or quotas): their streams
    /// end, and their usage carries over to the new settings.
    pub changed: usize,
    /// New names.
    pub added: usize,
    /// Gone: their tokens are refused and their streams end.
    pub removed: usize,
}

/// The principal of a request, as the interceptor leaves it in the request's
/// extensions.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

impl Auth {
    /// An authenticator for `config`.
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            by_hash: RwLock::new(Arc::new(
                config
                    .principals
                    .iter()
                    .map(|p| (p.token_sha256, Arc::new(Principal::new(p))))
                    .collect(),
            )),
            enabled: config.enabled(),
            health_requires_token: config.health_requires_token,
            reflection_requires_token: config.reflection_requires_token,
        }
    }

    /// Replaces the principals with `config`'s. A principal whose settings
    /// are the same carries on untouched (its streams, its counts); one
    /// whose settings changed, or that is gone, is revoked: its token no
    /// longer authenticates (a changed one's new token does) and its Watch
    /// streams end with UNAUTHENTICATED. A changed principal keeps counting
    /// what it holds (connections, streams, tracked keys, rate budgets)
    /// toward its quotas. Refused, changing nothing, when it would turn
    /// authentication on or off, which needs a restart; `health` and
    /// `reflection` also keep their startup settings.
    pub fn reload(&self, config: &AuthConfig) -> Result<Reloaded, String> {
        if !self.enabled {
            return Err("authentication is off: turning it on needs a restart".into());
        }
        if !config.enabled() {
            return Err(
                "the new settings configure no principal: turning authentication off needs a restart"
                    .into(),
            );
        }
        let mut by_hash = self.by_hash.write();
        let current = Arc::clone(&by_hash);
        let old: HashMap<&str, &Arc<Principal>> = current.values().map(|p| (&*p.name, p)).collect();
        let mut next = HashMap::with_capacity(config.principals.len());
        let mut reloaded = Reloaded::default();
        for p in &config.principals {
            let principal = match old.get(p.name.as_str()) {
                Some(was) if was.config == *p => {
                    reloaded.kept += 1;
                    Arc::clone(was)
                }
                Some(was) => {
                    reloaded.changed += 1;
                    Arc::new(Principal::with_usage(p, was.usage.clone()))
                }
                None => {
                    reloaded.added += 1;
                    Arc::new(Principal::new(p))
                }
            };
            next.insert(p.token_sha256, principal);
        }
        // Names and tokens are unique on both sides: each old principal was
        // kept, changed, or removed.
        reloaded.removed = current.len() - reloaded.kept - reloaded.changed;
        for was in current.values() {
            let kept = next
                .get(&was.config.token_sha256)
                .is_some_and(|p| Arc::ptr_eq(p, was));
            if !kept {
                was.revoke();
            }
        }
        *by_hash = Arc::new(next);
        Ok(reloaded)
    }

    /// Whether requests must carry a token.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether health checks must carry a token.
    pub fn health_requires_token(&self) -> bool {
        self.enabled() && self.health_requires_token
    }

    /// Whether reflection must carry a token.
    pub fn reflection_requires_token(&self) -> bool {
        self.enabled() && self.reflection_requires_token
    }

    /// The principal of a request's `authorization` metadata, or
    /// UNAUTHENTICATED saying what is wrong (never echoing the token).
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
    ) -> Result<Arc<Principal>, (Status, &'static str)> {
        let Some(value) = metadata.get("authorization") else {
            return Err((
                Status::unauthenticated(
                    "this server requires a token: send metadata `authorization: Bearer <token>`",
                ),
                "missing",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err((
                Status::unauthenticated(
                    "malformed `authorization` metadata: expected `Bearer <token>`",
                ),
                "malformed",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let principal = self.by_hash.read().get(&digest).cloned();
        let Some(principal) = principal else {
            return Err((
                Status::unauthenticated("unknown token: no principal has it"),
                "unknown",
            ));
        };
        if principal.expired(SystemTime::now()) {
            return Err((principal.expired_status(), "expired"));
        }
        Ok(principal)
    }
}

/// One accepted connection, as requests see it: counts it against the
/// `connections` quota of each principal that uses it, until it closes.
#[derive(Debug, Default)]
pub struct ConnectionUse {
    first: OnceLock<Arc<Principal>>,
    others: Mutex<Vec<Arc<Principal>>>,
}

impl ConnectionUse {
    /// Notes that `principal` sent a request on this connection; counts the
    /// connection against its quota the first time, or refuses.
    pub fn bind(&self, principal: &Arc<Principal>) -> Result<(), QuotaExceeded> {
        if let Some(first) = self.first.get() {
            if first.counts_as(principal) {
                return Ok(());
            }
        } else {
            // Claim the first slot; only the winner counts the connection.
            principal.open_connection()?;
            match self.first.set(principal.clone()) {
                Ok(()) => return Ok(()),
                Err(_) => principal.close_connection(),
            }
            if self.first.get().is_some_and(|f| f.counts_as(principal)) {
                return Ok(());
            }
        }
        let mut others = self.others.lock();
        if others.iter().any(|p| p.counts_as(principal)) {
            return Ok(());
        }
        principal.open_connection()?;
        others.push(principal.clone());
        Ok(())
    }
}

impl Drop for ConnectionUse {
    fn drop(&mut self) {
        if let Some(first) = self.first.get() {
            first.close_connection();
        }
        for p in self.others.get_mut().drain(..) {
            p.close_connection();
        }
    }
}

/// The tonic interceptor of the Coordinator and, when configured, of health
/// and reflection: authenticates and leaves a [`Caller`] in the extensions.
/// The router puts it only in front of a service that needs a token
/// ([`crate::routes::Guarded`]).
#[derive(Clone)]
pub struct Interceptor {
    auth: Arc<Auth>,
    metrics: Arc<Metrics>,
}

impl Interceptor {
    /// An interceptor that authenticates every request (when auth is on).
    pub fn new(auth: Arc<Auth>, metrics: Arc<Metrics>) -> Self {
        Self { auth, metrics }
    }
}

impl tonic::service::Interceptor for Interceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if !self.auth.enabled() {
            return Ok(request);
        }
        let principal = match self.auth.authenticate(request.metadata()) {
            Ok(p) => p,
            Err((status, reason)) => {
                self.metrics.auth_refused(reason);
                return Err(status);
            }
        };
        if let Some(conn) = request
            .extensions()
            .get::<crate::tls::ConnInfo>()
            .map(|c| c.usage.clone())
        {
            if let Err(e) = conn.bind(&principal) {
                self.metrics.quota_refused(e.quota);
                return Err(e.into());
            }
        }
        request.extensions_mut().insert(Caller(principal));
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn principal(scopes: &[(&str, &[Scope])], quotas: Quotas) -> Principal {
        Principal::new(&PrincipalConfig {
            name: "p".into(),
            token_sha256: [0; 32],
            expires: None,
            scopes: scopes
                .iter()
                .map(|(ns, list)| {
                    let mut s = Scopes::default();
                    for scope in *list {
                        s.insert(*scope);
                    }
                    (ns.to_string(), s)
                })
                .collect(),
            quotas,
        })
    }

    #[test]
    fn scopes_apply_per_namespace_and_star_applies_everywhere() {
        let p = principal(
            &[
                ("feed", &[Scope::Check, Scope::Watch]),
                ("*", &[Scope::Fill]),
            ],
            Quotas::default(),
        );
        assert!(p.allows_key(Scope::Check, "feed:user:1"));
        assert!(!p.allows_key(Scope::Check, "posts:1"));
        assert!(p.allows_key(Scope::Fill, "posts:1"));
        assert!(!p.allows_key(Scope::Publish, "feed:user:1"));
        assert!(p.require_prefix(Scope::Watch, "feed:").is_ok());
        let denied = p.require_prefix(Scope::Watch, "fe").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("\"watch\""),
            "{}",
            denied.message()
        );
        let denied = p.require_key(Scope::Publish, "feed:1").unwrap_err();
        assert!(
            denied.message().contains("\"feed\""),
            "{}",
            denied.message()
        );
        assert!(
            denied.message().contains("\"publish\""),
            "{}",
            denied.message()
        );
    }

    #[test]
    fn counted_quotas_refuse_past_the_limit_and_free_on_release() {
        let p = principal(
            &[],
            Quotas {
                streams: Some(2),
                tracked_keys: Some(10),
                ..Quotas::default()
            },
        );
        p.open_stream().unwrap();
        p.open_stream().unwrap();
        let e = p.open_stream().unwrap_err();
        assert_eq!(e.quota, "streams");
        p.close_stream();
        p.open_stream().unwrap();
        p.track(8).unwrap();
        assert_eq!(p.track(3).unwrap_err().quota, "tracked_keys");
        p.untrack(5);
        p.track(3).unwrap();
    }

    #[test]
    fn publish_rate_is_a_one_second_bucket() {
        let p = principal(
            &[],
            Quotas {
                publishes_per_second: Some(100),
                ..Quotas::default()
            },
        );
        p.publish(60).unwrap();
        p.publish(40).unwrap();
        let e = p.publish(50).unwrap_err();
        assert_eq!(e.quota, "publishes_per_second");
        assert!(
            e.message.contains("100 changes per second"),
            "{}",
            e.message
        );
    }

    #[test]
    fn fanout_budget_admits_until_in_debt() {
        let p = principal(
            &[],
            Quotas {
                fanout_per_second: Some(1000),
                ..Quotas::default()
            },
        );
        p.admit_fanout().unwrap();
        p.charge_fanout(5000);
        assert_eq!(p.admit_fanout().unwrap_err().quota, "fanout_per_second");
    }

    #[test]
    fn tokens_hash_to_hex_and_parse_back() {
        let token = new_token();
        assert!(token.starts_with("fd_") && token.len() == 3 + 43, "{token}");
        let hash = hash_token(&token);
        assert_eq!(hash.len(), 64);
        let parsed = parse_sha256(&hash).unwrap();
        assert_eq!(hex(&parsed), hash);
        assert_eq!(parse_sha256("xyz"), None);
        assert_eq!(parse_sha256(&"g".repeat(64)), None);
        // A known vector.
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn authentication_refuses_missing_malformed_unknown_and_expired_tokens() {
        let good = "fd_good";
        let old = "fd_old";
        let make = |name: &str, token: &str, expires| PrincipalConfig {
            name: name.into(),
            token_sha256: parse_sha256(&hash_token(token)).unwrap(),
            expires,
            scopes: vec![],
            quotas: Quotas::default(),
        };
        let auth = Auth::new(&AuthConfig {
            principals: vec![
                make("good", good, None),
                make("old", old, Some(SystemTime::now() - Duration::from_secs(1))),
            ],
            ..AuthConfig::default()
        });
        let with = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("authorization", v.parse().unwrap());
            m
        };
        assert_eq!(
            auth.authenticate(&MetadataMap::new()).unwrap_err().1,
            "missing"
        );
        assert_eq!(
            auth.authenticate(&with("Basic abc")).unwrap_err().1,
            "malformed"
        );
        assert_eq!(
            auth.authenticate(&with("Bearer")).unwrap_err().1,
            "malformed"
        );
        assert_eq!(
            auth.authenticate(&with("Bearer nope")).unwrap_err().1,
            "unknown"
        );
        let (status, reason) = auth.authenticate(&with("Bearer fd_old")).unwrap_err();
        assert_eq!(reason, "expired");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(!status.message().contains("fd_old"));
        assert_eq!(
            &*auth.authenticate(&with("bearer fd_good")).unwrap().name,
            "good"
        );
    }

    #[test]
    fn a_connection_counts_once_per_principal() {
        let p = Arc::new(principal(
            &[],
            Quotas {
                connections: Some(1),
                ..Quotas::default()
            },
        ));
        let a = ConnectionUse::default();
        a.bind(&p).unwrap();
        a.bind(&p).unwrap();
        let b = ConnectionUse::default();
        assert_eq!(b.bind(&p).unwrap_err().quota, "connections");
        drop(a);
        b.bind(&p).unwrap();
    }

    #[test]
    fn a_reload_keeps_the_unchanged_revokes_the_rest_and_carries_usage_over() {
        let make = |name: &str, token: &str, streams: Option<u64>| PrincipalConfig {
            name: name.into(),
            token_sha256: parse_sha256(&hash_token(token)).unwrap(),
            expires: None,
            scopes: vec![],
            quotas: Quotas {
                connections: Some(1),
                streams,
                ..Quotas::default()
            },
        };
        let with = |token: &str| {
            let mut m = MetadataMap::new();
            m.insert("authorization", format!("Bearer {token}").parse().unwrap());
            m
        };
        let auth = Auth::new(&AuthConfig {
            principals: vec![
                make("same", "fd_same", None),
                make("quota", "fd_quota", Some(1)),
                make("gone", "fd_gone", None),
            ],
            ..AuthConfig::default()
        });
        let same = auth.authenticate(&with("fd_same")).unwrap();
        let quota = auth.authenticate(&with("fd_quota")).unwrap();
        let gone = auth.authenticate(&with("fd_gone")).unwrap();
        quota.open_stream().unwrap();
        let connection = ConnectionUse::default();
        connection.bind(&quota).unwrap();

        let reloaded = auth
            .reload(&AuthConfig {
                principals: vec![
                    make("same", "fd_same", None),
                    // A new token, the same quota: changed.
                    make("quota", "fd_quota_2", Some(1)),
                    make("new", "fd_new", None),
                ],
                ..AuthConfig::default()
            })
            .unwrap();
        assert_eq!(
            reloaded,
            Reloaded {
                kept: 1,
                changed: 1,
                added: 1,
                removed: 1
            }
        );
        // The unchanged principal is the same one, not revoked.
        let same_after = auth.authenticate(&with("fd_same")).unwrap();
        assert!(Arc::ptr_eq(&same, &same_after));
        assert!(!same.is_revoked());
        // The removed one and the old token are refused; the old objects
        // are revoked.
        assert_eq!(
            auth.authenticate(&with("fd_gone")).unwrap_err().1,
            "unknown"
        );
        assert_eq!(
            auth.authenticate(&with("fd_quota")).unwrap_err().1,
            "unknown"
        );
        assert!(gone.is_revoked() && quota.is_revoked());
        assert_eq!(&*auth.authenticate(&with("fd_new")).unwrap().name, "new");
        // The changed principal still counts its open stream and its
        // connection: a second stream is refused, and the connection it
        // was using counts once.
        let quota_after = auth.authenticate(&with("fd_quota_2")).unwrap();
        assert!(!quota_after.is_revoked());
        assert_eq!(quota_after.open_stream().unwrap_err().quota, "streams");
        connection.bind(&quota_after).unwrap();
        assert_eq!(
            ConnectionUse::default()
                .bind(&quota_after)
                .unwrap_err()
                .quota,
            "connections"
        );
        // Closing what the old object counted frees it for the new one.
        quota.close_stream();
        quota_after.open_stream().unwrap();
        drop(connection);
        ConnectionUse::default().bind(&quota_after).unwrap();

        // Turning authentication off is refused, changing nothing.
        let e = auth.reload(&AuthConfig::default()).unwrap_err();
        assert!(e.contains("needs a restart"), "{e}");
        assert!(auth.authenticate(&with("fd_new")).is_ok());
        let off = Auth::new(&AuthConfig::default());
        assert!(off
            .reload(&AuthConfig {
                principals: vec![make("x", "fd_x", None)],
                ..AuthConfig::default()
            })
            .is_err());
        assert!(!off.enabled());
    }

    #[tokio::test]
    async fn revoked_completes_for_a_waiter_and_after_the_fact() {
        let auth = Auth::new(&AuthConfig {
            principals: vec![PrincipalConfig {
                name: "p".into(),
                token_sha256: [1; 32],
                expires: None,
                scopes: vec![],
                quotas: Quotas::default(),
            }],
            ..AuthConfig::default()
        });
        let p = auth.by_hash.read().values().next().unwrap().clone();
        let waiting = tokio::spawn({
            let p = p.clone();
            async move { p.revoked().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        auth.reload(&AuthConfig {
            principals: vec![PrincipalConfig {
                name: "q".into(),
                token_sha256: [2; 32],
                expires: None,
                scopes: vec![],
                quotas: Quotas::default(),
            }],
            ..AuthConfig::default()
        })
        .unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter wakes")
            .unwrap();
        // A stream that starts waiting after the reload ends at once.
        tokio::time::timeout(Duration::from_secs(10), p.revoked())
            .await
            .expect("already revoked");
        assert!(p.revoked_status().message().contains("\"p\""));
    }
}
