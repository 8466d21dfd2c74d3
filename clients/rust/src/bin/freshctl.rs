//! freshctl: freshd from a shell.
//!
//! Exit codes: 0 done, 1 the server refused or failed, 2 usage (including
//! unusable --token or --tls-* settings), 3 cannot connect (including a
//! failed TLS handshake), 4 not allowed (UNAUTHENTICATED: no token, or one the
//! server does not know; PERMISSION_DENIED: the token lacks the scope). With
//! `--json` every result is one JSON object per line on stdout (errors: one
//! object on stderr).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use freshd_client::pb;
use freshd_client::{code_name, Client, Error, WatchEvent};
use serde::Serialize;

const EXIT_SERVER: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CONNECT: u8 = 3;
const EXIT_NOT_ALLOWED: u8 = 4;

/// The default address: `http://`, or `https://` with a --tls-* option.
const DEFAULT_ADDR: &str = "127.0.0.1:50051";

#[derive(Debug, Parser)]
#[command(
    name = "freshctl",
    version,
    about = "freshctl: publish, fill, check, inspect and watch keys of a freshd server",
    after_help = "Exit codes: 0 done, 1 the server refused or failed, 2 usage, 3 cannot connect \
                  (or the TLS handshake failed), 4 not allowed (UNAUTHENTICATED or PERMISSION_DENIED)."
)]
struct Cli {
    /// freshd's gRPC address: host:port, http://host:port, or https://host:port
    /// for TLS (host:port with a --tls-* option is TLS too)
    #[arg(long, global = true, env = "FRESHD_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// The bearer token sent with every request; prefer the environment
    /// variable, which keeps it out of the process list and shell history
    #[arg(
        long,
        global = true,
        env = "FRESHD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// CA certificates (PEM) to trust for the server's certificate [default:
    /// the system's]
    #[arg(long, global = true, value_name = "PEM_FILE")]
    tls_ca: Option<PathBuf>,
    /// A client certificate chain (PEM), for servers that require mutual TLS
    #[arg(long, global = true, value_name = "PEM_FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert
    #[arg(long, global = true, value_name = "PEM_FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the
    /// address's host
    #[arg(long, global = true, value_name = "NAME")]
    tls_domain: Option<String>,
    /// Write results as JSON, one object per line (for scripts)
    #[arg(long, global = true)]
    json: bool,
    /// The client id sent with publishes, fills, checks and Watch streams
    #[arg(
        long,
        global = true,
        env = "FRESHCTL_CLIENT_ID",
        default_value = "freshctl"
    )]
    client_id: String,
    /// How long one request may take
    #[arg(long, global = true, default_value = "10s", value_parser = duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish changes: each key and every key that depends on it is invalidated
    Publish {
        /// The keys that changed
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
        /// Critical changes: caches must not serve a copy from before them
        #[arg(long)]
        critical: bool,
        /// The source's version of the change, for every KEY (a database LSN,
        /// say); a change not above the last one seen for its key is a
        /// duplicate
        #[arg(long, value_name = "N")]
        external_version: Option<u64>,
    },
    /// Register a cached key with its dependencies
    Fill {
        /// The key that was cached
        key: String,
        /// A key whose change must invalidate this one (repeat it)
        #[arg(long = "dep", value_name = "KEY")]
        deps: Vec<String>,
        /// How long the registration lives [default: the server's default_ttl]
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// A seq read before the origin (from check, publish or fill); the
        /// fill is refused if anything changed after it
        #[arg(long, value_name = "SEQ")]
        observed_seq: Option<u64>,
        /// The epoch of --observed-seq
        #[arg(long)]
        epoch: Option<u64>,
        /// The token of a lease from `freshctl lease`
        #[arg(long, value_name = "TOKEN")]
        lease_token: Option<u64>,
    },
    /// Check a cached copy: FRESH, STALE or UNKNOWN, and what to do about it
    Check {
        /// The key
        key: String,
        /// The version stored beside the copy (0: no copy)
        #[arg(long, default_value_t = 0)]
        version: u64,
        /// How old the copy is
        #[arg(long, value_parser = duration)]
        age: Option<Duration>,
        /// The epoch of --version
        #[arg(long)]
        epoch: Option<u64>,
        /// Wait until the server applied this seq (read your writes)
        #[arg(long, value_name = "SEQ")]
        min_seq: Option<u64>,
        /// The endpoint serving the copy (a metrics label)
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Everything freshd holds for a key
    Inspect {
        /// The key
        key: String,
    },
    /// Ask for a key's fill lease (the fill with its token releases it)
    Lease {
        /// The key
        key: String,
    },
    /// Tail invalidation notices live (Ctrl-C stops)
    Watch(WatchArgs),
    /// Server-wide counters and the open Watch streams
    Stats,
    /// Invalidate every key under a prefix: a dry run unless --yes
    Purge {
        /// Keys starting with it ("ns:" is a namespace; "" is every key)
        prefix: String,
        /// Only report what the purge would do (the default without --yes)
        #[arg(long)]
        dry_run: bool,
        /// Hard: copies refetch at once and notices go out (default: soft,
        /// copies revalidate, spread over the jitter)
        #[arg(long)]
        hard: bool,
        /// Really purge
        #[arg(long)]
        yes: bool,
        /// Go ahead although more than the server's max_purge_keys are affected
        #[arg(long)]
        confirm: bool,
        /// A soft purge's spread [default: the server's purge_jitter]
        #[arg(long, value_parser = duration)]
        jitter: Option<Duration>,
    },
    /// Freshness policies per namespace
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// Track an exact key (repeat it)
    #[arg(long = "track", value_name = "KEY")]
    track: Vec<String>,
    /// Watch every key under a prefix (repeat it; "" is every key). With
    /// neither --track nor --prefix, every key is watched
    #[arg(long = "prefix", value_name = "PREFIX")]
    prefixes: Vec<String>,
    /// Resume after EPOCH:SEQ, a token printed by an earlier watch
    #[arg(long, value_name = "EPOCH:SEQ")]
    resume: Option<String>,
    /// Skip notices caused by publishes with the same --client-id
    #[arg(long)]
    no_loop: bool,
    /// Ask for a progress watermark this often (the resume token)
    #[arg(long, default_value = "5s", value_parser = duration)]
    progress_every: Duration,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// The policy that applies to a namespace (no namespace: the default)
    Get {
        /// The namespace (the part of a key before its first ':')
        namespace: Option<String>,
    },
    /// Set a namespace's policy (no namespace: the default); unset fields are 0
    Set {
        /// The namespace
        namespace: Option<String>,
        /// Older copies answer REFETCH
        #[arg(long, value_parser = duration)]
        max_age: Option<Duration>,
        /// Current copies older than this answer REVALIDATE
        #[arg(long, value_parser = duration)]
        revalidate_after: Option<Duration>,
        /// Stale copies this young answer REVALIDATE instead of REFETCH
        #[arg(long, value_parser = duration)]
        stale_while_revalidate: Option<Duration>,
        /// Let critical changes be served stale like any other
        #[arg(long)]
        allow_stale_on_critical: bool,
        /// The share of cache hits clients should check, 0 to 1 [default: 1]
        #[arg(long, value_name = "RATE")]
        check_sample_rate: Option<f64>,
    },
    /// Every policy: the default first
    List,
    /// Remove a namespace's policy (it falls back to the default)
    Delete {
        /// The namespace
        namespace: String,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}; write it like 500ms, 2s, 5m"))
}

/// A failure and its exit code.
struct Failure {
    code: u8,
    kind: &'static str,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            kind: "USAGE",
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match &e {
            Error::Connect { addr, message } if addr.starts_with("https://") => Failure {
                code: EXIT_CONNECT,
                kind: "CANNOT_CONNECT",
                message: format!(
                    "cannot connect to {addr} ({message}): is freshd running with TLS there, \
                     and does --tls-ca trust its certificate (--tls-domain if the name differs)?"
                ),
            },
            Error::Connect { addr, message } => Failure {
                code: EXIT_CONNECT,
                kind: "CANNOT_CONNECT",
                message: format!(
                    "cannot connect to {addr} ({message}): is freshd running? start it with \
                     `cargo run --release --bin freshd`, or point --addr (or FRESHD_ADDR) at it"
                ),
            },
            Error::InvalidAddress { .. } => Failure {
                code: EXIT_USAGE,
                kind: "USAGE",
                message: format!("{e}: write it like http://127.0.0.1:50051"),
            },
            Error::InvalidSetting { .. } => Failure {
                code: EXIT_USAGE,
                kind: "USAGE",
                message: e.to_string(),
            },
            Error::Unauthenticated(_) => Failure {
                code: EXIT_NOT_ALLOWED,
                kind: "UNAUTHENTICATED",
                message: format!(
                    "{e}: set the token in FRESHD_TOKEN (or --token); `freshd --new-token` makes one"
                ),
            },
            Error::PermissionDenied(_) => Failure {
                code: EXIT_NOT_ALLOWED,
                kind: "PERMISSION_DENIED",
                message: e.to_string(),
            },
            _ => Failure {
                code: EXIT_SERVER,
                kind: e.code().map_or("ERROR", code_name),
                message: e.to_string(),
            },
        }
    }
}

/// Where results go: plain text or JSON lines, colour on a terminal.
struct Out {
    json: bool,
    color: bool,
}

impl Out {
    fn json<T: Serialize>(&self, value: &T) {
        let line = serde_json::to_string(value).expect("messages serialize");
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }

    fn line(&self, text: impl AsRef<str>) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{}", text.as_ref());
        let _ = stdout.flush();
    }

    fn paint(&self, code: &str, text: impl AsRef<str>) -> String {
        if self.color {
            format!("\x1b[{code}m{}\x1b[0m", text.as_ref())
        } else {
            text.as_ref().to_owned()
        }
    }

    fn bold(&self, t: impl AsRef<str>) -> String {
        self.paint("1", t)
    }
    fn dim(&self, t: impl AsRef<str>) -> String {
        self.paint("2", t)
    }
    fn red(&self, t: impl AsRef<str>) -> String {
        self.paint("31", t)
    }
    fn green(&self, t: impl AsRef<str>) -> String {
        self.paint("32", t)
    }
    fn yellow(&self, t: impl AsRef<str>) -> String {
        self.paint("33", t)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Out {
        json: cli.json,
        color: !cli.json
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_SERVER);
        }
    };
    match runtime.block_on(run(cli, &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if out.json {
                let error = serde_json::json!({
                    "error": {"code": failure.kind, "message": failure.message}
                });
                eprintln!("{error}");
            } else {
                eprintln!("error: {}", failure.message);
            }
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli, out: &Out) -> Result<(), Failure> {
    let mut builder = Client::builder(&cli.addr)
        .client_id(cli.client_id.clone())
        .connect_timeout(Duration::from_secs(3).min(cli.timeout))
        .timeout(Some(cli.timeout));
    if let Some(token) = &cli.token {
        builder = builder.token(token.as_str());
    }
    if let Some(ca) = &cli.tls_ca {
        builder = builder.tls_ca_file(ca);
    }
    if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
        builder = builder.tls_identity_files(cert, key);
    }
    if let Some(domain) = &cli.tls_domain {
        builder = builder.tls_domain(domain.as_str());
    }
    let client = builder.connect().await?;
    match cli.command {
        Command::Publish {
            keys,
            critical,
            external_version,
        } => {
            let changes: Vec<pb::Change> = keys
                .iter()
                .map(|k| {
                    let change = pb::Change::new(k.as_str()).with_critical(critical);
                    match external_version {
                        Some(v) => change.with_external_version(v),
                        None => change,
                    }
                })
                .collect();
            let response = client.publish(changes).await?;
            if out.json {
                out.json(&response);
            } else {
                print_publish(out, &keys, &response);
            }
        }
        Command::Fill {
            key,
            deps,
            ttl,
            observed_seq,
            epoch,
            lease_token,
        } => {
            let mut request = pb::FillRequest::new(key.as_str(), deps)
                .with_observed(observed_seq.unwrap_or(0), epoch.unwrap_or(0));
            if let Some(ttl) = ttl {
                request = request.with_ttl(ttl);
            }
            if let Some(token) = lease_token {
                request = request.with_lease_token(token);
            }
            let response = client.fill(request).await?;
            if out.json {
                out.json(&response);
            } else {
                out.line(format!(
                    "filled {}: version {} (seq {}, epoch {}), ttl {}",
                    out.bold(&key),
                    out.bold(response.version.to_string()),
                    response.seq,
                    response.epoch,
                    ms(response.ttl_ms)
                ));
            }
        }
        Command::Check {
            key,
            version,
            age,
            epoch,
            min_seq,
            endpoint,
        } => {
            let mut request = pb::CheckRequest::new(key.as_str(), version)
                .with_epoch(epoch.unwrap_or(0))
                .with_min_seq(min_seq.unwrap_or(0))
                .with_endpoint(endpoint.unwrap_or_default());
            if let Some(age) = age {
                request = request.with_age(age);
            }
            let response = client.check(request).await?;
            if out.json {
                out.json(&response);
            } else {
                print_check(out, &key, version, &response);
            }
        }
        Command::Inspect { key } => {
            let response = client.inspect(key).await?;
            if out.json {
                out.json(&response);
            } else {
                print_inspect(out, &response);
            }
        }
        Command::Lease { key } => {
            let response = client.lease(key.as_str()).await?;
            if out.json {
                out.json(&response);
            } else if response.granted {
                out.line(format!(
                    "lease of {} granted: token {} (seq {}, epoch {}) for {}; fill with --lease-token {}",
                    out.bold(&key),
                    out.bold(response.token.to_string()),
                    response.seq,
                    response.epoch,
                    ms(response.ttl_ms),
                    response.token
                ));
            } else {
                out.line(format!(
                    "a fill of {} is in flight (lease held for {} more); current version {}; retry after {}",
                    out.bold(&key),
                    ms(response.ttl_ms),
                    response.version,
                    ms(response.retry_after_ms)
                ));
            }
        }
        Command::Watch(args) => watch(&client, out, args).await?,
        Command::Stats => {
            let response = client.stats().await?;
            if out.json {
                out.json(&response);
            } else {
                print_stats(out, &response);
            }
        }
        Command::Purge {
            prefix,
            dry_run,
            hard,
            yes,
            confirm,
            jitter,
        } => {
            let dry_run = dry_run || !yes;
            let mut request = pb::PurgeRequest::new(prefix.as_str())
                .with_dry_run(dry_run)
                .with_hard(hard)
                .with_confirm(confirm);
            if let Some(jitter) = jitter {
                request = request.with_jitter(jitter);
            }
            let response = client.purge(request).await?;
            if out.json {
                out.json(&response);
            } else {
                print_purge(out, &prefix, hard, dry_run, &response);
            }
            if dry_run && !yes && !out.json {
                eprintln!("dry run: nothing was purged; add --yes to purge");
            }
        }
        Command::Policy(command) => policy(&client, out, command).await?,
    }
    Ok(())
}

async fn policy(client: &Client, out: &Out, command: PolicyCommand) -> Result<(), Failure> {
    let print = |p: &pb::NamespacePolicy| {
        if out.json {
            out.json(p);
        } else {
            print_policy(out, p);
        }
    };
    match command {
        PolicyCommand::Get { namespace } => {
            print(&client.get_policy(namespace.unwrap_or_default()).await?);
        }
        PolicyCommand::Set {
            namespace,
            max_age,
            revalidate_after,
            stale_while_revalidate,
            allow_stale_on_critical,
            check_sample_rate,
        } => {
            let mut policy = pb::FreshnessPolicy::default()
                .with_allow_stale_on_critical(allow_stale_on_critical);
            if let Some(d) = max_age {
                policy = policy.with_max_age(d);
            }
            if let Some(d) = revalidate_after {
                policy = policy.with_revalidate_after(d);
            }
            if let Some(d) = stale_while_revalidate {
                policy = policy.with_stale_while_revalidate(d);
            }
            if let Some(rate) = check_sample_rate {
                policy = policy.with_check_sample_rate(rate);
            }
            print(
                &client
                    .set_policy(namespace.unwrap_or_default(), policy)
                    .await?,
            );
        }
        PolicyCommand::List => {
            for p in client.list_policies().await? {
                print(&p);
            }
        }
        PolicyCommand::Delete { namespace } => {
            client.delete_policy(namespace.as_str()).await?;
            if out.json {
                out.json(&serde_json::json!({"namespace": namespace, "deleted": true}));
            } else {
                out.line(format!(
                    "deleted the policy of {}: it uses the default now",
                    out.bold(&namespace)
                ));
            }
        }
    }
    Ok(())
}

async fn watch(client: &Client, out: &Out, args: WatchArgs) -> Result<(), Failure> {
    let mut start = pb::WatchStart::new()
        .with_no_loop(args.no_loop)
        .with_track(args.track.iter().cloned())
        .with_subscribe(args.prefixes.iter().cloned());
    if args.track.is_empty() && args.prefixes.is_empty() {
        start = start.with_subscribe([""]);
    }
    if let Some(token) = &args.resume {
        let parsed = token
            .split_once(':')
            .and_then(|(e, s)| Some((e.parse::<u64>().ok()?, s.parse::<u64>().ok()?)));
        let Some((epoch, seq)) = parsed else {
            return Err(Failure::usage(format!(
                "--resume {token:?} is not EPOCH:SEQ (two numbers, as printed by an earlier watch)"
            )));
        };
        start = start.with_resume(epoch, seq);
    }
    let mut stream = client.watch(start).await?;
    let started = stream.started;
    let mut token = (started.epoch, started.seq);
    if out.json {
        out.json(&serde_json::json!({ "started": started }));
    } else {
        let outcome = match started.outcome() {
            pb::ResumeOutcome::FromHistory => " (resumed: missed notices follow)",
            pb::ResumeOutcome::Repaired => " (repaired: the token was older than the history)",
            _ => "",
        };
        eprintln!(
            "{}",
            out.dim(format!(
                "watching {} from seq {} of epoch {}{outcome}; Ctrl-C stops",
                client.addr(),
                started.seq,
                started.epoch
            ))
        );
    }
    let mut tick = tokio::time::interval(args.progress_every.max(Duration::from_millis(10)));
    tick.reset();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => {
                if !out.json {
                    eprintln!("{}", out.dim(format!("stopped; resume with --resume {}:{}", token.0, token.1)));
                }
                return Ok(());
            }
            _ = tick.tick() => {
                let _ = stream.progress();
            }
            event = stream.next() => match event {
                Some(Ok(WatchEvent::Notices(notices))) => {
                    for n in &notices {
                        if out.json {
                            out.json(&serde_json::json!({ "notice": n }));
                        } else {
                            print_notice(out, n);
                        }
                    }
                    if let Some(last) = notices.last() {
                        token = (started.epoch, last.seq);
                        let _ = stream.ack(last.seq);
                    }
                }
                Some(Ok(WatchEvent::Progress(p))) => {
                    token = (p.epoch, p.seq);
                    let _ = stream.ack(p.seq);
                    if out.json {
                        out.json(&serde_json::json!({ "progress": p }));
                    }
                }
                Some(Ok(WatchEvent::Reset(r))) => {
                    if out.json {
                        out.json(&serde_json::json!({ "reset": r }));
                    } else {
                        let scope = if r.prefix.is_empty() { "every key".to_owned() } else { format!("keys under {:?}", r.prefix) };
                        out.line(out.yellow(format!(
                            "reset ({}): revalidate {scope} changed after seq {}",
                            reason_name(r.reason()),
                            r.since
                        )));
                    }
                }
                Some(Ok(WatchEvent::Refused(r))) => {
                    if out.json {
                        out.json(&serde_json::json!({ "refused": r }));
                    } else {
                        out.line(out.yellow(format!("refused request {}: {}", r.request, r.message)));
                    }
                }
                Some(Err(e)) => {
                    let mut failure = Failure::from(e);
                    failure.message = format!(
                        "{}; resume with --resume {}:{}",
                        failure.message, token.0, token.1
                    );
                    return Err(failure);
                }
                None => {
                    if !out.json {
                        eprintln!("{}", out.dim(format!("the server ended the stream; resume with --resume {}:{}", token.0, token.1)));
                    }
                    return Ok(());
                }
            }
        }
    }
}

fn reason_name(r: pb::ResetReason) -> &'static str {
    match r {
        pb::ResetReason::HistoryCompacted => "history compacted",
        pb::ResetReason::NewEpoch => "new epoch: drop everything",
        pb::ResetReason::SlowConsumer => "slow consumer",
        pb::ResetReason::Unspecified => "unspecified",
    }
}

fn ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

fn unix_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    let ago = SystemTime::now()
        .duration_since(at)
        .map(|d| {
            format!(
                " ({} ago)",
                humantime::format_duration(Duration::from_secs(d.as_secs()))
            )
        })
        .unwrap_or_default();
    format!("{}{ago}", humantime::format_rfc3339_millis(at))
}

fn print_publish(out: &Out, keys: &[String], r: &pb::PublishResponse) {
    out.line(format!(
        "published: seq {} (epoch {})",
        out.bold(r.seq.to_string()),
        r.epoch
    ));
    for (key, result) in keys.iter().zip(&r.results) {
        if result.duplicate {
            out.line(format!(
                "  {}  {}",
                key,
                out.dim(format!(
                    "duplicate: the external version is not above the last seen; version {}",
                    result.version
                ))
            ));
        } else {
            out.line(format!(
                "  {}  version {}, {} key(s) invalidated",
                out.bold(key),
                result.version,
                result.invalidated
            ));
        }
    }
}

fn print_check(out: &Out, key: &str, version: u64, r: &pb::CheckResponse) {
    let freshness = match r.freshness() {
        pb::Freshness::Fresh => out.green("FRESH"),
        pb::Freshness::Stale => out.red("STALE"),
        other => out.yellow(other.as_str_name().trim_start_matches("FRESHNESS_")),
    };
    let decision = match r.decision() {
        pb::Decision::Fresh => "FRESH: serve it",
        pb::Decision::Revalidate => "REVALIDATE: serve it, refresh in the background",
        pb::Decision::Refetch => "REFETCH: go to the origin now",
        pb::Decision::Unknown => "UNKNOWN: not registered, treat it as a miss",
        pb::Decision::Unspecified => "UNSPECIFIED",
    };
    let critical = if r.critical {
        out.red(", critical")
    } else {
        String::new()
    };
    out.line(format!(
        "{} @ {version}: {freshness}{critical}",
        out.bold(key)
    ));
    out.line(format!("  decision       {decision}"));
    out.line(format!("  version        {} (current)", r.version));
    out.line(format!("  seq            {} (epoch {})", r.seq, r.epoch));
    out.line(format!("  sample rate    {}", r.check_sample_rate));
}

fn print_inspect(out: &Out, r: &pb::InspectResponse) {
    out.line(out.bold(&r.key));
    out.line(format!("  version          {}", r.version));
    if r.registered {
        out.line(format!(
            "  registered       yes, ttl left {}",
            ms(r.ttl_left_ms)
        ));
    } else {
        out.line("  registered       no");
    }
    let deps = if r.dependencies.is_empty() {
        "-".to_owned()
    } else {
        r.dependencies.join(", ")
    };
    out.line(format!("  dependencies     {deps}"));
    out.line(format!("  dependents       {}", r.dependents));
    if r.last_change_seq == 0 {
        out.line("  last change      none known");
    } else {
        let critical = if r.critical {
            out.red(" (critical)")
        } else {
            String::new()
        };
        out.line(format!(
            "  last change      seq {}{critical}",
            r.last_change_seq
        ));
        out.line(format!(
            "    applied        {}",
            unix_ms(r.last_change_unix_ms)
        ));
        out.line(format!(
            "    event time     {}",
            unix_ms(r.event_time_unix_ms)
        ));
    }
    if let Some(v) = r.external_version {
        out.line(format!("  external version {v}"));
    }
}

fn print_stats(out: &Out, r: &pb::StatsResponse) {
    let rows = [
        ("keys", r.keys.to_string()),
        ("edges", r.edges.to_string()),
        ("shards", r.shards.to_string()),
        ("seq", r.seq.to_string()),
        ("epoch", r.epoch.to_string()),
        ("uptime", ms(r.uptime_ms / 1000 * 1000)),
        ("expired", r.expired.to_string()),
        ("oversized publishes", r.oversized_publishes.to_string()),
        (
            "history",
            format!(
                "{} notices, from seq {}",
                r.history_notices, r.history_floor_seq
            ),
        ),
        (
            "leases",
            format!(
                "{} granted, {} contended, {} held",
                r.leases_granted, r.leases_contended, r.leases_held
            ),
        ),
        ("purges", format!("{} ({} keys)", r.purges, r.purged_keys)),
    ];
    for (name, value) in rows {
        out.line(format!("{:<20} {value}", name));
    }
    out.line(format!("{:<20} {}", "watch streams", r.subscribers.len()));
    for s in &r.subscribers {
        let id = if s.client_id.is_empty() {
            "(no id)"
        } else {
            s.client_id.as_str()
        };
        out.line(format!(
            "  {}  acked {}, lag {}, queued {}, tracking {}, prefixes {}, overflows {}, ack delay {}",
            out.bold(id),
            s.acked_seq,
            s.lag,
            s.queued,
            s.tracked_keys,
            s.prefixes,
            s.overflows,
            ms(s.ack_delay_ms)
        ));
    }
}

fn print_purge(out: &Out, prefix: &str, hard: bool, dry_run: bool, r: &pb::PurgeResponse) {
    let kind = if hard { "hard" } else { "soft" };
    let what = if dry_run {
        format!("dry run of a {kind} purge")
    } else {
        format!("{kind} purge")
    };
    out.line(format!("{what} of {:?}:", prefix));
    out.line(format!(
        "  matched          {} key(s) under the prefix",
        r.matched
    ));
    out.line(format!(
        "  affected         {} key(s) with their dependents",
        r.affected
    ));
    if hard {
        out.line(format!("  watch streams    {}", r.subscribers));
        out.line(format!("  notices          {}", r.notices));
    }
    let applied = if r.applied {
        out.red("yes")
    } else {
        "no".to_owned()
    };
    out.line(format!(
        "  applied          {applied} (seq {}, epoch {})",
        r.seq, r.epoch
    ));
}

fn print_policy(out: &Out, p: &pb::NamespacePolicy) {
    let name = if p.namespace.is_empty() {
        "(default)".to_owned()
    } else {
        p.namespace.clone()
    };
    let inherited = if p.is_default && !p.namespace.is_empty() {
        out.dim(" (the default applies)")
    } else {
        String::new()
    };
    let policy = p.policy.unwrap_or_default();
    let field = |ms_value: u64, none: &str| {
        if ms_value == 0 {
            none.to_owned()
        } else {
            ms(ms_value)
        }
    };
    out.line(format!("{}{inherited}", out.bold(name)));
    out.line(format!(
        "  max_age                  {}",
        field(policy.max_age_ms, "none")
    ));
    out.line(format!(
        "  revalidate_after         {}",
        field(policy.revalidate_after_ms, "never")
    ));
    out.line(format!(
        "  stale_while_revalidate   {}",
        field(policy.stale_while_revalidate_ms, "never")
    ));
    out.line(format!(
        "  allow_stale_on_critical  {}",
        policy.allow_stale_on_critical
    ));
    out.line(format!(
        "  check_sample_rate        {}",
        policy.check_sample_rate.unwrap_or(1.0)
    ));
}

fn print_notice(out: &Out, n: &pb::Notice) {
    let cause = if n.repair {
        out.yellow("repair")
    } else if n.cause.is_empty() {
        "changed (cause out of scope)".to_owned()
    } else if n.cause == n.key {
        "changed".to_owned()
    } else {
        format!("via {}", n.cause)
    };
    let critical = if n.critical {
        format!(" {}", out.red("CRITICAL"))
    } else {
        String::new()
    };
    out.line(format!(
        "{}  {}  version {}  {cause}{critical}",
        out.dim(format!("{:>8}", n.seq)),
        out.bold(&n.key),
        n.version
    ));
}
