//! Configuration: flags, `FRESHD_*` environment variables and an optional
//! TOML file, resolved into one typed [`Config`].
//!
//! Precedence, highest first: a flag, its environment variable, the file,
//! the default. Every setting has the same name in all three places
//! (`--max-key-bytes`, `FRESHD_MAX_KEY_BYTES`, `max_key_bytes`). A bad value
//! is a [`ConfigError`] that names the setting; `main` exits with code 64.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::auth::{AuthConfig, PrincipalConfig, Quotas, Scope, Scopes};
use crate::metrics::MetricsConfig;
use crate::policy::{Policies, Policy};
use crate::store::StoreConfig;
use crate::tls::TlsConfig;
use crate::validate::Limits;
use crate::wal::{FsyncPolicy, WalConfig};

/// The largest `history_bytes`: 192 MiB.
pub const MAX_HISTORY_BYTES: u64 = 192 << 20;

/// Command-line flags. Each also reads its `FRESHD_*` environment variable.
#[derive(Debug, Default, Parser)]
#[command(
    name = "freshd",
    version,
    about = "freshd: a gRPC cache-coordination server"
)]
pub struct Args {
    /// A TOML file with any of the settings below (same names, snake_case).
    #[arg(long, env = "FRESHD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Keep a write-ahead log here; without it the server is memory-only
    #[arg(long, env = "FRESHD_DATA_DIR", value_name = "PATH")]
    pub data_dir: Option<String>,
    /// When the log calls fsync: always, interval or never [default: interval]
    #[arg(long, env = "FRESHD_FSYNC", value_name = "POLICY")]
    pub fsync: Option<String>,
    /// The period of fsync=interval [default: 100ms]
    #[arg(long, env = "FRESHD_FSYNC_INTERVAL", value_name = "DURATION")]
    pub fsync_interval: Option<String>,
    /// Size after which a new log segment starts [default: 67108864]
    #[arg(long, env = "FRESHD_WAL_SEGMENT_BYTES", value_name = "BYTES")]
    pub wal_segment_bytes: Option<String>,
    /// Bytes of closed log segments after which they are compacted into a snapshot [default: 134217728]
    #[arg(long, env = "FRESHD_SNAPSHOT_BYTES", value_name = "BYTES")]
    pub snapshot_bytes: Option<String>,
    /// Truncate a corrupt log at the first bad record instead of refusing to start
    #[arg(long)]
    pub repair: bool,
    /// gRPC listen address [default: 127.0.0.1:50051]
    #[arg(long, env = "FRESHD_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin HTTP address for /metrics, /healthz and /readyz, or "off" [default: 127.0.0.1:50052]
    #[arg(long, env = "FRESHD_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Namespaces with their own metric label; the rest are "other" [default: 100]
    #[arg(long, env = "FRESHD_METRICS_MAX_NAMESPACES", value_name = "N")]
    pub metrics_max_namespaces: Option<String>,
    /// Endpoints with their own metric label; the rest are "other" [default: 100]
    #[arg(long, env = "FRESHD_METRICS_MAX_ENDPOINTS", value_name = "N")]
    pub metrics_max_endpoints: Option<String>,
    /// Shards of the key map, a power of two [default: 64]
    #[arg(long, env = "FRESHD_SHARDS", value_name = "N")]
    pub shards: Option<String>,
    /// TTL of a fill that asks for none [default: 5m]
    #[arg(long, env = "FRESHD_DEFAULT_TTL", value_name = "DURATION")]
    pub default_ttl: Option<String>,
    /// Longest TTL a fill is granted [default: 24h]
    #[arg(long, env = "FRESHD_MAX_TTL", value_name = "DURATION")]
    pub max_ttl: Option<String>,
    /// How long a change to a key nobody registered is remembered [default: 60s]
    #[arg(long, env = "FRESHD_CHANGE_RETENTION", value_name = "DURATION")]
    pub change_retention: Option<String>,
    /// How often expired registrations are swept [default: 100ms]
    #[arg(long, env = "FRESHD_EXPIRY_INTERVAL", value_name = "DURATION")]
    pub expiry_interval: Option<String>,
    /// Most registrations removed per sweep step [default: 1000]
    #[arg(long, env = "FRESHD_EXPIRY_BATCH", value_name = "N")]
    pub expiry_batch: Option<String>,
    /// Longest key, in bytes [default: 1024]
    #[arg(long, env = "FRESHD_MAX_KEY_BYTES", value_name = "BYTES")]
    pub max_key_bytes: Option<String>,
    /// Most dependencies per fill [default: 1024]
    #[arg(long, env = "FRESHD_MAX_DEPENDENCIES", value_name = "N")]
    pub max_dependencies: Option<String>,
    /// Most items per CheckBatch and changes per Publish [default: 10000]
    #[arg(long, env = "FRESHD_MAX_BATCH_ITEMS", value_name = "N")]
    pub max_batch_items: Option<String>,
    /// Transitive invalidations per publish above which it is logged and counted [default: 100000]
    #[arg(long, env = "FRESHD_MAX_INVALIDATIONS_PER_PUBLISH", value_name = "N")]
    pub max_invalidations_per_publish: Option<String>,
    /// Largest gRPC message, in bytes, either way [default: 16777216]
    #[arg(long, env = "FRESHD_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<String>,
    /// Most streams (calls and Watch streams) open at once on one connection [default: 10000]
    #[arg(long, env = "FRESHD_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub max_concurrent_streams: Option<String>,
    /// Bytes one stream's answers may hold beyond the client's windows before its writer waits [default: 65536]
    #[arg(long, env = "FRESHD_STREAM_SEND_BUFFER_BYTES", value_name = "BYTES")]
    pub stream_send_buffer_bytes: Option<String>,
    /// Bytes one connection may hold that its socket has not taken before its writers wait [default: 1048576]
    #[arg(
        long,
        env = "FRESHD_CONNECTION_SEND_BUFFER_BYTES",
        value_name = "BYTES"
    )]
    pub connection_send_buffer_bytes: Option<String>,
    /// How long in-flight requests may finish after SIGTERM or SIGINT [default: 10s]
    #[arg(long, env = "FRESHD_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// Idle time before TCP keepalive probes a client connection (then
    /// every third of it, 3 probes); 0 turns them off [default: 300s]
    #[arg(long, env = "FRESHD_TCP_KEEPALIVE", value_name = "DURATION")]
    pub tcp_keepalive: Option<String>,
    /// Notices kept so that Watch streams resume exactly [default: 100000]
    #[arg(long, env = "FRESHD_HISTORY_NOTICES", value_name = "N")]
    pub history_notices: Option<String>,
    /// Bytes of notices kept for resumes [default: 67108864]
    #[arg(long, env = "FRESHD_HISTORY_BYTES", value_name = "BYTES")]
    pub history_bytes: Option<String>,
    /// Notices queued per Watch stream before it is caught up instead [default: 10000]
    #[arg(long, env = "FRESHD_QUEUE_NOTICES", value_name = "N")]
    pub queue_notices: Option<String>,
    /// Bytes of notices queued per Watch stream [default: 16777216]
    #[arg(long, env = "FRESHD_QUEUE_BYTES", value_name = "BYTES")]
    pub queue_bytes: Option<String>,
    /// Keys one Watch stream may track [default: 100000]
    #[arg(long, env = "FRESHD_MAX_TRACKED_KEYS", value_name = "N")]
    pub max_tracked_keys: Option<String>,
    /// Prefixes one Watch stream may watch [default: 1000]
    #[arg(long, env = "FRESHD_MAX_PREFIXES", value_name = "N")]
    pub max_prefixes: Option<String>,
    /// A publish that comes sooner than this after the last one's notices
    /// were written leaves its own to go out with what follows, in fewer
    /// writes, and so do those within four times this of each other after
    /// it; 0 writes every publish's notices at once [default: 2ms]
    #[arg(long, env = "FRESHD_WATCH_COALESCE", value_name = "DURATION")]
    pub watch_coalesce: Option<String>,
    /// How long a fill lease lasts [default: 10s]
    #[arg(long, env = "FRESHD_LEASE_TTL", value_name = "DURATION")]
    pub lease_ttl: Option<String>,
    /// Longest read-your-writes wait for a min_seq [default: 1s]
    #[arg(long, env = "FRESHD_MAX_WAIT_FOR_SEQ", value_name = "DURATION")]
    pub max_wait_for_seq: Option<String>,
    /// Purges affecting more keys need confirm [default: 10000]
    #[arg(long, env = "FRESHD_MAX_PURGE_KEYS", value_name = "N")]
    pub max_purge_keys: Option<String>,
    /// Most purges (not dry runs) per minute [default: 10]
    #[arg(long, env = "FRESHD_PURGES_PER_MINUTE", value_name = "N")]
    pub purges_per_minute: Option<String>,
    /// A soft purge's default spread [default: 5s]
    #[arg(long, env = "FRESHD_PURGE_JITTER", value_name = "DURATION")]
    pub purge_jitter: Option<String>,
    /// Log format: text or json [default: text]; the filter comes from RUST_LOG
    #[arg(long, env = "FRESHD_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// The server's TLS certificate chain (PEM); with --tls-key, serves TLS only
    #[arg(long, env = "FRESHD_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<String>,
    /// The server's TLS private key (PEM)
    #[arg(long, env = "FRESHD_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<String>,
    /// CA certificates (PEM) that client certificates must chain to: requires mutual TLS
    #[arg(long, env = "FRESHD_TLS_CLIENT_CA", value_name = "PATH")]
    pub tls_client_ca: Option<String>,
    /// How often the TLS files are checked for changes and reloaded [default: 10s]
    #[arg(long, env = "FRESHD_TLS_RELOAD_INTERVAL", value_name = "DURATION")]
    pub tls_reload_interval: Option<String>,
    /// How often the --config file is checked for changed principals, which are reloaded [default: 10s]
    #[arg(long, env = "FRESHD_AUTH_RELOAD_INTERVAL", value_name = "DURATION")]
    pub auth_reload_interval: Option<String>,
    /// Allow plaintext gRPC on an address that is not loopback
    #[arg(long, env = "FRESHD_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
    /// Print a new random token and the SHA-256 to configure for it, then exit
    #[arg(long)]
    pub new_token: bool,
    /// Read a token from standard input and print its SHA-256, then exit
    #[arg(long)]
    pub hash_token: bool,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole, validated configuration of a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// The write-ahead log; `None`: memory only.
    pub wal: Option<WalConfig>,
    /// Admin HTTP address; `None`: off.
    pub admin_listen: Option<SocketAddr>,
    /// Metric label bounds.
    pub metrics: MetricsConfig,
    /// Store settings.
    pub store: StoreConfig,
    /// Request limits.
    pub limits: Limits,
    /// Period of the expiry sweep.
    pub expiry_interval: Duration,
    /// Most registrations removed per sweep step.
    pub expiry_batch: usize,
    /// Largest gRPC message either way.
    pub max_message_bytes: usize,
    /// What one connection may hold: open streams, and answers its client
    /// has not taken.
    pub connections: crate::conn::ConnLimits,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// Idle time before TCP keepalive probes a client connection, so that
    /// one whose peer vanished (a host gone without a FIN) is closed and
    /// its Watch streams end; `None`: no probes.
    pub tcp_keepalive: Option<Duration>,
    /// Log format.
    pub log_format: LogFormat,
    /// TLS; `None`: plaintext.
    pub tls: Option<TlsConfig>,
    /// Tokens, principals, scopes and quotas; no principal: open.
    pub auth: AuthConfig,
    /// The file the settings came from, if any: with principals in it, it
    /// is checked every `auth_reload_interval`, and changed principals are
    /// reloaded ([`auth_from_text`]).
    pub config_file: Option<PathBuf>,
    /// How often `config_file` is checked for changed principals.
    pub auth_reload_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            wal: None,
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 50052))),
            metrics: MetricsConfig::default(),
            store: StoreConfig::default(),
            limits: Limits::default(),
            expiry_interval: Duration::from_millis(100),
            expiry_batch: 1000,
            max_message_bytes: 16 << 20,
            connections: crate::conn::ConnLimits::default(),
            shutdown_grace: Duration::from_secs(10),
            tcp_keepalive: Some(Duration::from_secs(300)),
            log_format: LogFormat::Text,
            tls: None,
            auth: AuthConfig::default(),
            config_file: None,
            auth_reload_interval: Duration::from_secs(10),
        }
    }
}

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{setting}` (from {origin}): {message}")]
pub struct ConfigError {
    /// The setting's name.
    pub setting: String,
    /// Where the value came from.
    pub origin: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// The settings a TOML file may hold.
const FILE_SETTINGS: &[&str] = &[
    "listen",
    "data_dir",
    "fsync",
    "fsync_interval",
    "wal_segment_bytes",
    "snapshot_bytes",
    "admin_listen",
    "metrics_max_namespaces",
    "metrics_max_endpoints",
    "shards",
    "default_ttl",
    "max_ttl",
    "change_retention",
    "expiry_interval",
    "expiry_batch",
    "max_key_bytes",
    "max_dependencies",
    "max_batch_items",
    "max_invalidations_per_publish",
    "max_message_bytes",
    "max_concurrent_streams",
    "stream_send_buffer_bytes",
    "connection_send_buffer_bytes",
    "shutdown_grace",
    "tcp_keepalive",
    "history_notices",
    "history_bytes",
    "queue_notices",
    "queue_bytes",
    "max_tracked_keys",
    "max_prefixes",
    "watch_coalesce",
    "lease_ttl",
    "max_wait_for_seq",
    "max_purge_keys",
    "purges_per_minute",
    "purge_jitter",
    "log_format",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "tls_reload_interval",
    "auth_reload_interval",
    "allow_plaintext",
];

/// The tables a TOML file may hold: freshness policies.
const FILE_TABLES: &[&str] = &["default_policy", "policies", "auth"];

/// The keys of the `[auth]` table.
const AUTH_KEYS: &[&str] = &["health", "reflection", "default_quotas", "principals"];

/// The keys of one `[[auth.principals]]` entry.
const PRINCIPAL_KEYS: &[&str] = &["name", "token_sha256", "expires", "scopes", "quotas"];

/// The keys of a quotas table.
const QUOTA_KEYS: &[&str] = &[
    "connections",
    "streams",
    "tracked_keys",
    "publishes_per_second",
    "fanout_per_second",
];

/// The keys of a policy table.
const POLICY_KEYS: &[&str] = &[
    "max_age",
    "revalidate_after",
    "stale_while_revalidate",
    "allow_stale_on_critical",
    "check_sample_rate",
];

/// Values from the file, by setting name.
struct FileValues {
    path: Option<PathBuf>,
    table: toml::Table,
}

impl FileValues {
    fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self {
                path: None,
                table: toml::Table::new(),
            });
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| Self::failure(path, format!("cannot read it: {e}")))?;
        Self::parse(path, &text)
    }

    /// What is wrong with the file at `path`.
    fn failure(path: &Path, message: String) -> ConfigError {
        ConfigError {
            setting: "config".into(),
            origin: format!("--config / FRESHD_CONFIG = {}", path.display()),
            message,
        }
    }

    /// The file at `path`, from its `text`.
    fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let fail = |message: String| Self::failure(path, message);
        let table: toml::Table = text
            .parse()
            .map_err(|e| fail(format!("not valid TOML: {e}")))?;
        if let Some(unknown) = table
            .keys()
            .find(|k| !FILE_SETTINGS.contains(&k.as_str()) && !FILE_TABLES.contains(&k.as_str()))
        {
            return Err(fail(format!(
                "unknown setting `{unknown}`; known settings: {}, and the tables {}",
                FILE_SETTINGS.join(", "),
                FILE_TABLES.join(", ")
            )));
        }
        Ok(Self {
            path: Some(path.to_owned()),
            table,
        })
    }

    /// The raw value of `name` and where it came from: the flag or
    /// environment value when given, else the file's.
    fn pick(&self, name: &str, cli: Option<String>) -> Result<Option<Raw>, ConfigError> {
        if let Some(value) = cli {
            return Ok(Some(Raw {
                value,
                origin: format!(
                    "--{} / FRESHD_{}",
                    name.replace('_', "-"),
                    name.to_uppercase()
                ),
            }));
        }
        let Some(value) = self.table.get(name) else {
            return Ok(None);
        };
        let origin = format!(
            "{} in {}",
            name,
            self.path.as_deref().unwrap_or(Path::new("?")).display()
        );
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            other => {
                return Err(ConfigError {
                    setting: name.into(),
                    origin,
                    message: format!("expected a string or an integer, got {}", other.type_str()),
                })
            }
        };
        Ok(Some(Raw { value, origin }))
    }
}

/// The durability flags, resolved together.
struct WalArgs {
    data_dir: Option<String>,
    fsync: Option<String>,
    fsync_interval: Option<String>,
    wal_segment_bytes: Option<String>,
    snapshot_bytes: Option<String>,
    repair: bool,
}

impl FileValues {
    /// The write-ahead log settings, if a data directory is set.
    fn wal(&self, args: &WalArgs) -> Result<Option<WalConfig>, ConfigError> {
        let Some(dir) = self.pick("data_dir", args.data_dir.clone())? else {
            return Ok(None);
        };
        if dir.value.is_empty() {
            return Err(dir.error("data_dir", "must not be empty"));
        }
        let mut interval = Duration::from_millis(100);
        if let Some(raw) = self.pick("fsync_interval", args.fsync_interval.clone())? {
            interval = parse_duration("fsync_interval", &raw)?;
            if interval.is_zero() {
                return Err(raw.error("fsync_interval", "must be above zero"));
            }
        }
        let fsync = match self.pick("fsync", args.fsync.clone())? {
            None => FsyncPolicy::Interval(interval),
            Some(raw) => match raw.value.as_str() {
                "always" => FsyncPolicy::Always,
                "interval" => FsyncPolicy::Interval(interval),
                "never" => FsyncPolicy::Never,
                other => {
                    return Err(raw.error(
                        "fsync",
                        format!("{other:?} is not one of: always, interval, never"),
                    ))
                }
            },
        };
        let mut segment_bytes = 64 << 20;
        if let Some(raw) = self.pick("wal_segment_bytes", args.wal_segment_bytes.clone())? {
            segment_bytes = parse_int("wal_segment_bytes", &raw, 4096, 1 << 40)?;
        }
        let mut snapshot_bytes = 128 << 20;
        if let Some(raw) = self.pick("snapshot_bytes", args.snapshot_bytes.clone())? {
            snapshot_bytes = parse_int("snapshot_bytes", &raw, 4096, u64::MAX)?;
        }
        Ok(Some(WalConfig {
            dir: PathBuf::from(dir.value),
            fsync,
            segment_bytes,
            repair: args.repair,
            snapshot_bytes,
        }))
    }

    /// The `[default_policy]` and `[policies.<namespace>]` tables.
    fn policies(&self) -> Result<Policies, ConfigError> {
        let mut policies = Policies::default();
        if let Some(value) = self.table.get("default_policy") {
            policies.default = self.policy("default_policy", value)?;
        }
        if let Some(value) = self.table.get("policies") {
            let toml::Value::Table(namespaces) = value else {
                return Err(self.error("policies", "expected a table of namespaces"));
            };
            for (namespace, value) in namespaces {
                let name = format!("policies.{namespace}");
                if namespace.is_empty() || namespace.contains(':') {
                    return Err(self.error(&name, "a namespace is non-empty and has no ':'"));
                }
                policies
                    .namespaces
                    .insert(namespace.clone(), self.policy(&name, value)?);
            }
        }
        Ok(policies)
    }

    /// The `[auth]` table.
    fn auth(&self) -> Result<AuthConfig, ConfigError> {
        let mut auth = AuthConfig::default();
        let Some(value) = self.table.get("auth") else {
            return Ok(auth);
        };
        let toml::Value::Table(table) = value else {
            return Err(self.error("auth", "expected a table"));
        };
        if let Some(unknown) = table.keys().find(|k| !AUTH_KEYS.contains(&k.as_str())) {
            return Err(self.error(
                &format!("auth.{unknown}"),
                format!("unknown setting; known: {}", AUTH_KEYS.join(", ")),
            ));
        }
        for (key, slot) in [
            ("health", &mut auth.health_requires_token),
            ("reflection", &mut auth.reflection_requires_token),
        ] {
            match table.get(key) {
                None => {}
                Some(toml::Value::String(s)) if s == "open" => *slot = false,
                Some(toml::Value::String(s)) if s == "token" => *slot = true,
                Some(_) => {
                    return Err(self.error(&format!("auth.{key}"), "expected \"open\" or \"token\""))
                }
            }
        }
        let defaults = match table.get("default_quotas") {
            None => Quotas::default(),
            Some(v) => self.quotas("auth.default_quotas", v, Quotas::default())?,
        };
        let principals = match table.get("principals") {
            None => return Ok(auth),
            Some(toml::Value::Array(list)) => list,
            Some(_) => {
                return Err(self.error(
                    "auth.principals",
                    "expected an array of tables: [[auth.principals]]",
                ))
            }
        };
        for (i, value) in principals.iter().enumerate() {
            let at = format!("auth.principals[{i}]");
            let principal = self.principal(&at, value, defaults)?;
            if auth.principals.iter().any(|p| p.name == principal.name) {
                return Err(self.error(
                    &format!("{at}.name"),
                    format!("{:?} names two principals", principal.name),
                ));
            }
            if auth
                .principals
                .iter()
                .any(|p| p.token_sha256 == principal.token_sha256)
            {
                return Err(self.error(
                    &format!("{at}.token_sha256"),
                    "two principals have the same token",
                ));
            }
            auth.principals.push(principal);
        }
        Ok(auth)
    }

    fn principal(
        &self,
        at: &str,
        value: &toml::Value,
        defaults: Quotas,
    ) -> Result<PrincipalConfig, ConfigError> {
        let toml::Value::Table(table) = value else {
            return Err(self.error(at, "expected a table"));
        };
        if let Some(unknown) = table.keys().find(|k| !PRINCIPAL_KEYS.contains(&k.as_str())) {
            return Err(self.error(
                &format!("{at}.{unknown}"),
                format!("unknown setting; known: {}", PRINCIPAL_KEYS.join(", ")),
            ));
        }
        let name = match table.get("name") {
            Some(toml::Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(self.error(&format!("{at}.name"), "expected a non-empty string")),
        };
        let token_sha256 = match table.get("token_sha256") {
            Some(toml::Value::String(s)) => crate::auth::parse_sha256(s),
            _ => None,
        }
        .ok_or_else(|| {
            self.error(
                &format!("{at}.token_sha256"),
                "expected the token's SHA-256 as 64 hex digits (`freshd --new-token` makes a token and its hash)",
            )
        })?;
        let expires = match table.get("expires") {
            None => None,
            Some(toml::Value::String(s)) => {
                Some(humantime::parse_rfc3339_weak(s).map_err(|e| {
                    self.error(
                        &format!("{at}.expires"),
                        format!("{s:?} is not a time like 2027-01-31T00:00:00Z ({e})"),
                    )
                })?)
            }
            Some(toml::Value::Datetime(d)) => {
                let s = d.to_string();
                Some(humantime::parse_rfc3339_weak(&s).map_err(|e| {
                    self.error(
                        &format!("{at}.expires"),
                        format!("{s:?} is not a UTC time like 2027-01-31T00:00:00Z ({e})"),
                    )
                })?)
            }
            Some(_) => {
                return Err(self.error(
                    &format!("{at}.expires"),
                    "expected a time like 2027-01-31T00:00:00Z",
                ))
            }
        };
        let mut scopes = Vec::new();
        match table.get("scopes") {
            None => {}
            Some(toml::Value::Table(by_ns)) => {
                for (ns, list) in by_ns {
                    let field = format!("{at}.scopes.{ns}");
                    if ns.is_empty() || (ns != "*" && ns.contains(':')) {
                        return Err(self.error(
                            &field,
                            "a namespace is non-empty and has no ':' (or is \"*\" for every namespace)",
                        ));
                    }
                    let toml::Value::Array(list) = list else {
                        return Err(
                            self.error(&field, "expected a list like [\"check\", \"watch\"]")
                        );
                    };
                    let mut set = Scopes::default();
                    for item in list {
                        let scope = item.as_str().and_then(Scope::parse).ok_or_else(|| {
                            self.error(
                                &field,
                                format!(
                                    "{item} is not a scope; scopes: {}",
                                    Scope::ALL.map(Scope::name).join(", ")
                                ),
                            )
                        })?;
                        set.insert(scope);
                    }
                    scopes.push((ns.clone(), set));
                }
            }
            Some(_) => {
                return Err(self.error(
                    &format!("{at}.scopes"),
                    "expected a table of namespace = [scopes]",
                ))
            }
        }
        let quotas = match table.get("quotas") {
            None => defaults,
            Some(v) => self.quotas(&format!("{at}.quotas"), v, defaults)?,
        };
        Ok(PrincipalConfig {
            name,
            token_sha256,
            expires,
            scopes,
            quotas,
        })
    }

    fn quotas(
        &self,
        at: &str,
        value: &toml::Value,
        defaults: Quotas,
    ) -> Result<Quotas, ConfigError> {
        let toml::Value::Table(table) = value else {
            return Err(self.error(at, "expected a table"));
        };
        let mut quotas = defaults;
        for (key, value) in table {
            let slot = match key.as_str() {
                "connections" => &mut quotas.connections,
                "streams" => &mut quotas.streams,
                "tracked_keys" => &mut quotas.tracked_keys,
                "publishes_per_second" => &mut quotas.publishes_per_second,
                "fanout_per_second" => &mut quotas.fanout_per_second,
                _ => {
                    return Err(self.error(
                        &format!("{at}.{key}"),
                        format!("unknown quota; known: {}", QUOTA_KEYS.join(", ")),
                    ))
                }
            };
            match value {
                toml::Value::Integer(n) if *n >= 0 => *slot = Some(*n as u64),
                toml::Value::String(s) if s == "unlimited" => *slot = None,
                _ => {
                    return Err(self.error(
                        &format!("{at}.{key}"),
                        "expected a whole number from 0, or \"unlimited\"",
                    ))
                }
            }
        }
        Ok(quotas)
    }

    /// `allow_plaintext` from the file: a boolean.
    fn allow_plaintext(&self) -> Result<bool, ConfigError> {
        match self.table.get("allow_plaintext") {
            None => Ok(false),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(_) => Err(self.error("allow_plaintext", "expected true or false")),
        }
    }

    fn error(&self, setting: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            setting: setting.into(),
            origin: self
                .path
                .as_deref()
                .unwrap_or(Path::new("?"))
                .display()
                .to_string(),
            message: message.into(),
        }
    }

    fn policy(&self, name: &str, value: &toml::Value) -> Result<Policy, ConfigError> {
        let toml::Value::Table(table) = value else {
            return Err(self.error(name, "expected a table"));
        };
        if let Some(unknown) = table.keys().find(|k| !POLICY_KEYS.contains(&k.as_str())) {
            return Err(self.error(
                &format!("{name}.{unknown}"),
                format!("unknown policy setting; known: {}", POLICY_KEYS.join(", ")),
            ));
        }
        let duration = |key: &str| -> Result<Option<Duration>, ConfigError> {
            match table.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => {
                    humantime::parse_duration(s).map(Some).map_err(|e| {
                        self.error(
                            &format!("{name}.{key}"),
                            format!("{s:?} is not a duration ({e})"),
                        )
                    })
                }
                Some(_) => {
                    Err(self.error(&format!("{name}.{key}"), "expected a duration like \"5s\""))
                }
            }
        };
        let mut policy = Policy {
            max_age: duration("max_age")?.filter(|d| !d.is_zero()),
            revalidate_after: duration("revalidate_after")?.filter(|d| !d.is_zero()),
            stale_while_revalidate: duration("stale_while_revalidate")?.unwrap_or_default(),
            ..Policy::default()
        };
        match table.get("allow_stale_on_critical") {
            None => {}
            Some(toml::Value::Boolean(b)) => policy.allow_stale_on_critical = *b,
            Some(_) => {
                return Err(self.error(
                    &format!("{name}.allow_stale_on_critical"),
                    "expected true or false",
                ))
            }
        }
        match table.get("check_sample_rate") {
            None => {}
            Some(toml::Value::Float(f)) => policy.check_sample_rate = *f,
            Some(toml::Value::Integer(i)) => policy.check_sample_rate = *i as f64,
            Some(_) => {
                return Err(self.error(
                    &format!("{name}.check_sample_rate"),
                    "expected a number from 0 to 1",
                ))
            }
        }
        policy
            .validate(name)
            .map_err(|e| self.error(name, e.to_string()))?;
        Ok(policy)
    }
}

struct Raw {
    value: String,
    origin: String,
}

impl Raw {
    fn error(&self, setting: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            setting: setting.into(),
            origin: self.origin.clone(),
            message: message.into(),
        }
    }
}

fn parse_duration(setting: &str, raw: &Raw) -> Result<Duration, ConfigError> {
    humantime::parse_duration(&raw.value).map_err(|e| {
        raw.error(
            setting,
            format!(
                "{:?} is not a duration ({e}); write it like 500ms, 30s, 5m or 24h",
                raw.value
            ),
        )
    })
}

fn parse_int(setting: &str, raw: &Raw, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n: u64 = raw
        .value
        .trim()
        .parse()
        .map_err(|_| raw.error(setting, format!("{:?} is not a whole number", raw.value)))?;
    if n < min || n > max {
        return Err(raw.error(
            setting,
            format!("{n} is out of range; allowed: {min} to {max}"),
        ));
    }
    Ok(n)
}

/// The principals of the TOML file at `path` whose content is `text` (its
/// `[auth]` table), checked as at startup: what a reload of the
/// principals applies.
pub fn auth_from_text(path: &Path, text: &str) -> Result<AuthConfig, ConfigError> {
    FileValues::parse(path, text)?.auth()
}

impl Config {
    /// Resolves flags, environment and file into a validated configuration.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let file = FileValues::load(args.config.as_deref())?;
        let args_wal = WalArgs {
            data_dir: args.data_dir.clone(),
            fsync: args.fsync.clone(),
            fsync_interval: args.fsync_interval.clone(),
            wal_segment_bytes: args.wal_segment_bytes.clone(),
            snapshot_bytes: args.snapshot_bytes.clone(),
            repair: args.repair,
        };
        let mut config = Config::default();

        if let Some(raw) = file.pick("listen", args.listen)? {
            config.listen = raw.value.parse().map_err(|_| {
                raw.error(
                    "listen",
                    format!("{:?} is not an address like 127.0.0.1:50051", raw.value),
                )
            })?;
        }
        if let Some(raw) = file.pick("admin_listen", args.admin_listen)? {
            config.admin_listen = match raw.value.as_str() {
                "off" => None,
                v => Some(v.parse().map_err(|_| {
                    raw.error(
                        "admin_listen",
                        format!("{v:?} is not an address like 127.0.0.1:50052, or \"off\""),
                    )
                })?),
            };
        }
        if let Some(raw) = file.pick("shards", args.shards)? {
            let n = parse_int("shards", &raw, 1, 4096)?;
            if !n.is_power_of_two() {
                return Err(raw.error("shards", format!("{n} is not a power of two")));
            }
            config.store.shards = n as usize;
        }
        let mut max_wait_for_seq = config.limits.max_wait_for_seq;
        let mut purge_jitter = config.limits.purge_jitter;
        let mut tcp_keepalive = config.tcp_keepalive.unwrap_or_default();
        let durations: [(&str, Option<String>, &mut Duration); 10] = [
            ("tcp_keepalive", args.tcp_keepalive, &mut tcp_keepalive),
            ("lease_ttl", args.lease_ttl, &mut config.store.lease_ttl),
            (
                "watch_coalesce",
                args.watch_coalesce,
                &mut config.store.hub.coalesce,
            ),
            (
                "max_wait_for_seq",
                args.max_wait_for_seq,
                &mut max_wait_for_seq,
            ),
            ("purge_jitter", args.purge_jitter, &mut purge_jitter),
            (
                "default_ttl",
                args.default_ttl,
                &mut config.store.default_ttl,
            ),
            ("max_ttl", args.max_ttl, &mut config.store.max_ttl),
            (
                "change_retention",
                args.change_retention,
                &mut config.store.change_retention,
            ),
            (
                "expiry_interval",
                args.expiry_interval,
                &mut config.expiry_interval,
            ),
            (
                "shutdown_grace",
                args.shutdown_grace,
                &mut config.shutdown_grace,
            ),
        ];
        for (name, cli, slot) in durations {
            if let Some(raw) = file.pick(name, cli)? {
                let d = parse_duration(name, &raw)?;
                if d.is_zero()
                    && !matches!(
                        name,
                        "shutdown_grace"
                            | "max_wait_for_seq"
                            | "purge_jitter"
                            | "watch_coalesce"
                            | "tcp_keepalive"
                    )
                {
                    return Err(raw.error(name, "must be above zero"));
                }
                if name == "tcp_keepalive" && !d.is_zero() && d < Duration::from_secs(1) {
                    return Err(raw.error(name, "must be 0 (off) or at least 1s"));
                }
                *slot = d;
            }
        }
        config.tcp_keepalive = (!tcp_keepalive.is_zero()).then_some(tcp_keepalive);
        let mut expiry_batch = config.expiry_batch as u64;
        let mut max_key_bytes = config.limits.max_key_bytes as u64;
        let mut max_dependencies = config.limits.max_dependencies as u64;
        let mut max_batch_items = config.limits.max_batch_items as u64;
        let mut max_message_bytes = config.max_message_bytes as u64;
        let mut max_concurrent_streams = u64::from(config.connections.max_streams);
        let mut stream_buffer = config.connections.stream_buffer as u64;
        let mut connection_buffer = config.connections.connection_buffer as u64;
        let hub = &mut config.store.hub;
        let mut history_notices = hub.history_notices as u64;
        let mut history_bytes = hub.history_bytes as u64;
        let mut queue_notices = hub.queue_notices as u64;
        let mut queue_bytes = hub.queue_bytes as u64;
        let mut max_tracked_keys = hub.max_tracked_keys as u64;
        let mut max_prefixes = hub.max_prefixes as u64;
        let mut max_namespaces = config.metrics.max_namespaces as u64;
        let mut max_endpoints = config.metrics.max_endpoints as u64;
        let mut max_purge_keys = config.limits.max_purge_keys;
        let mut purges_per_minute = config.limits.purges_per_minute;
        let ints: [(&str, Option<String>, &mut u64, u64, u64); 19] = [
            (
                "metrics_max_namespaces",
                args.metrics_max_namespaces,
                &mut max_namespaces,
                0,
                100_000,
            ),
            (
                "metrics_max_endpoints",
                args.metrics_max_endpoints,
                &mut max_endpoints,
                0,
                100_000,
            ),
            (
                "max_purge_keys",
                args.max_purge_keys,
                &mut max_purge_keys,
                0,
                u64::MAX,
            ),
            (
                "purges_per_minute",
                args.purges_per_minute,
                &mut purges_per_minute,
                0,
                1 << 20,
            ),
            (
                "queue_bytes",
                args.queue_bytes,
                &mut queue_bytes,
                1024,
                1 << 40,
            ),
            (
                "history_notices",
                args.history_notices,
                &mut history_notices,
                0,
                1 << 32,
            ),
            (
                "history_bytes",
                args.history_bytes,
                &mut history_bytes,
                0,
                // A snapshot saves the history in one record, and a record
                // holds at most 256 MiB; the accounted bytes exceed the
                // encoded ones.
                MAX_HISTORY_BYTES,
            ),
            (
                "queue_notices",
                args.queue_notices,
                &mut queue_notices,
                1,
                1 << 32,
            ),
            (
                "max_tracked_keys",
                args.max_tracked_keys,
                &mut max_tracked_keys,
                0,
                1 << 32,
            ),
            (
                "max_prefixes",
                args.max_prefixes,
                &mut max_prefixes,
                0,
                1 << 20,
            ),
            (
                "expiry_batch",
                args.expiry_batch,
                &mut expiry_batch,
                1,
                1 << 20,
            ),
            (
                "max_key_bytes",
                args.max_key_bytes,
                &mut max_key_bytes,
                1,
                1 << 20,
            ),
            (
                "max_dependencies",
                args.max_dependencies,
                &mut max_dependencies,
                0,
                1 << 20,
            ),
            (
                "max_batch_items",
                args.max_batch_items,
                &mut max_batch_items,
                1,
                1 << 24,
            ),
            (
                "max_invalidations_per_publish",
                args.max_invalidations_per_publish,
                &mut config.store.max_invalidations_per_publish,
                1,
                u64::MAX,
            ),
            (
                "max_message_bytes",
                args.max_message_bytes,
                &mut max_message_bytes,
                1024,
                1 << 30,
            ),
            (
                "max_concurrent_streams",
                args.max_concurrent_streams,
                &mut max_concurrent_streams,
                1,
                u64::from(u32::MAX),
            ),
            (
                "stream_send_buffer_bytes",
                args.stream_send_buffer_bytes,
                &mut stream_buffer,
                16 * 1024,
                1 << 30,
            ),
            (
                "connection_send_buffer_bytes",
                args.connection_send_buffer_bytes,
                &mut connection_buffer,
                64 * 1024,
                1 << 32,
            ),
        ];
        for (name, cli, slot, min, max) in ints {
            if let Some(raw) = file.pick(name, cli)? {
                *slot = parse_int(name, &raw, min, max)?;
            }
        }
        let hub = &mut config.store.hub;
        hub.history_notices = history_notices as usize;
        hub.history_bytes = history_bytes as usize;
        hub.queue_notices = queue_notices as usize;
        hub.queue_bytes = queue_bytes as usize;
        hub.max_tracked_keys = max_tracked_keys as usize;
        hub.max_prefixes = max_prefixes as usize;
        config.expiry_batch = expiry_batch as usize;
        config.metrics.max_namespaces = max_namespaces as usize;
        config.metrics.max_endpoints = max_endpoints as usize;
        config.limits.max_wait_for_seq = max_wait_for_seq;
        config.limits.purge_jitter = purge_jitter;
        config.limits.max_purge_keys = max_purge_keys;
        config.limits.purges_per_minute = purges_per_minute;
        config.store.policies = file.policies()?;
        config.wal = file.wal(&args_wal)?;
        config.limits.max_key_bytes = max_key_bytes as usize;
        config.limits.max_dependencies = max_dependencies as usize;
        config.limits.max_batch_items = max_batch_items as usize;
        config.max_message_bytes = max_message_bytes as usize;
        config.connections = crate::conn::ConnLimits {
            max_streams: max_concurrent_streams as u32,
            stream_buffer: stream_buffer as usize,
            connection_buffer: connection_buffer as usize,
        };

        config.auth = file.auth()?;
        config.config_file = args.config.clone();
        if let Some(raw) = file.pick("auth_reload_interval", args.auth_reload_interval)? {
            config.auth_reload_interval = parse_duration("auth_reload_interval", &raw)?;
            if config.auth_reload_interval.is_zero() {
                return Err(raw.error("auth_reload_interval", "must be above zero"));
            }
        }
        let tls_cert = file.pick("tls_cert", args.tls_cert)?;
        let tls_key = file.pick("tls_key", args.tls_key)?;
        let tls_client_ca = file.pick("tls_client_ca", args.tls_client_ca)?;
        let mut reload_interval = Duration::from_secs(10);
        if let Some(raw) = file.pick("tls_reload_interval", args.tls_reload_interval)? {
            reload_interval = parse_duration("tls_reload_interval", &raw)?;
            if reload_interval.is_zero() {
                return Err(raw.error("tls_reload_interval", "must be above zero"));
            }
        }
        config.tls = match (tls_cert, tls_key) {
            (None, None) => {
                if let Some(raw) = tls_client_ca {
                    return Err(raw.error(
                        "tls_client_ca",
                        "mutual TLS needs the server's own certificate: set tls_cert and tls_key",
                    ));
                }
                None
            }
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert: PathBuf::from(cert.value),
                key: PathBuf::from(key.value),
                client_ca: tls_client_ca.map(|raw| PathBuf::from(raw.value)),
                reload_interval,
            }),
            (Some(raw), None) => {
                return Err(raw.error("tls_key", "tls_cert is set, tls_key is not: set both"))
            }
            (None, Some(raw)) => {
                return Err(raw.error("tls_cert", "tls_key is set, tls_cert is not: set both"))
            }
        };
        let allow_plaintext = args.allow_plaintext || file.allow_plaintext()?;
        if config.tls.is_none() && !allow_plaintext && !config.listen.ip().is_loopback() {
            return Err(ConfigError {
                setting: "listen".into(),
                origin: "listen, tls_cert and allow_plaintext".into(),
                message: format!(
                    "{} is not a loopback address and TLS is off: set tls_cert and tls_key, \
                     or allow_plaintext to serve plaintext gRPC (key names and tokens would cross the network in clear)",
                    config.listen
                ),
            });
        }

        if let Some(raw) = file.pick("log_format", args.log_format)? {
            config.log_format = match raw.value.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(
                        raw.error("log_format", format!("{other:?} is not one of: text, json"))
                    )
                }
            };
        }
        if config.store.default_ttl > config.store.max_ttl {
            return Err(ConfigError {
                setting: "default_ttl".into(),
                origin: "default_ttl and max_ttl".into(),
                message: format!(
                    "default_ttl ({:?}) is above max_ttl ({:?})",
                    config.store.default_ttl, config.store.max_ttl
                ),
            });
        }
        Ok(config)
    }

    /// A configuration for tests and embedding: defaults, listening on an
    /// ephemeral loopback port.
    pub fn ephemeral() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..Self::default()
        }
    }
}
