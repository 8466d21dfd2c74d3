//! Serving: the services (Coordinator, health, reflection; routed in
//! [`crate::routes`]), the expiry task, readiness, and graceful shutdown.
//!
//! `grpc.health.v1` answers NOT_SERVING, overall ("") and for
//! `freshd.v1.Coordinator`, until the server is ready and again from the moment
//! shutdown begins; in-flight requests then get `shutdown_grace` to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::auth::{Auth, Interceptor};
use crate::config::Config;
use crate::log::MemoryLog;
use crate::metrics::Metrics;
use crate::pb::coordinator_server::CoordinatorServer;
use crate::routes::{Direct, Guarded, Routes};
use crate::service::CoordinatorService;
use crate::store::Store;
use crate::tls::Reloadable;
use crate::wal::{FileLog, WalRecord};

/// The gRPC name of the Coordinator service, as health checks name it.
pub const COORDINATOR_SERVICE: &str = "freshd.v1.Coordinator";

/// Serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener could not be set up.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The write-ahead log could not be opened.
    #[error("the log under --data-dir: {0}")]
    Wal(#[from] crate::wal::WalError),
    /// The TLS certificate, key or client CA could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The store a configuration describes, with its metrics: memory-only, or
/// over the write-ahead log under `data_dir`, with the records to replay.
pub fn new_store(config: &Config) -> Result<(Arc<Store>, Recovery), ServeError> {
    let metrics = Arc::new(Metrics::new(config.metrics));
    let (log, recovery): (Box<dyn crate::log::Log>, Recovery) = match &config.wal {
        None => (Box::new(MemoryLog::new()), Recovery::default()),
        Some(wal) => {
            let mut opened = FileLog::open(wal.clone())?;
            opened.log.enable_compaction(config.store.clone());
            tracing::info!(
                dir = %wal.dir.display(),
                snapshot = ?opened.snapshot,
                records = opened.records.len(),
                dropped_torn_tail = opened.dropped_tail,
                "opened the write-ahead log"
            );
            (
                Box::new(opened.log),
                Recovery {
                    snapshot: opened.snapshot,
                    records: opened.records,
                },
            )
        }
    };
    let store = Store::with_metrics(config.store.clone(), log, metrics);
    Ok((Arc::new(store), recovery))
}

/// What a server must load before it serves: a snapshot, then log records.
#[derive(Default)]
pub struct Recovery {
    /// The newest snapshot.
    pub snapshot: Option<std::path::PathBuf>,
    /// The log records after it.
    pub records: Vec<WalRecord>,
}

impl Recovery {
    fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.records.is_empty()
    }
}

/// Serves gRPC on `listener` (and the admin HTTP endpoint on
/// `config.admin_listen`) until `shutdown` completes, then drains.
///
/// On Unix, serving watches SIGHUP, which asks for the TLS files and the
/// principals of `config.config_file` to be checked for changes at once.
/// Watching it replaces the signal's default action (ending the process)
/// for the whole process, as for any tokio signal handler.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let admin = match config.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let (store, recovery) = new_store(&config)?;
    serve_store(config, listener, admin, store, recovery, shutdown).await
}

/// Serves `store` on `listener` (gRPC) and `admin` (HTTP: `/metrics`,
/// `/healthz`, `/readyz`) until `shutdown` completes, then drains. `recovery`
/// holds the log records to replay first; health says NOT_SERVING, and the
/// Coordinator answers UNAVAILABLE, until they are applied.
pub async fn serve_store(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    store: Arc<Store>,
    recovery: Recovery,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_until(config, listener, admin, store, recovery, shutdown, None).await
}

/// [`serve_store`], telling `serving` once the server answers requests.
async fn serve_until(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    store: Arc<Store>,
    recovery: Recovery,
    shutdown: impl Future<Output = ()>,
    on_serving: Option<oneshot::Sender<()>>,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = Arc::new(AtomicBool::new(false));
    set_health(&health, &ready, ServingStatus::NotServing).await;
    store.metrics().register_store(&store);
    let admin = match admin {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "admin HTTP serving /metrics, /healthz, /readyz");
            Some(tokio::spawn(crate::admin::serve(
                listener,
                store.metrics().clone(),
                ready.clone(),
            )))
        }
        None => None,
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let tls = config.tls.clone().map(Reloadable::new).transpose()?;
    let auth = Arc::new(Auth::new(&config.auth));
    let metrics = store.metrics().clone();
    let interceptor = Interceptor::new(auth.clone(), metrics.clone());
    let service = Arc::new(CoordinatorService::with_gate(
        store.clone(),
        config.limits.clone(),
        ready.clone(),
    ));
    let coordinator = CoordinatorServer::from_arc(service.clone())
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let routes = Routes::new(Guarded::new(
        coordinator,
        interceptor.clone(),
        auth.enabled(),
    ))
    .direct(Direct::new(
        service,
        interceptor.clone(),
        auth.enabled(),
        config.max_message_bytes,
    ))
    .add(
        health_service,
        interceptor.clone(),
        auth.enabled() && auth.health_requires_token(),
    )
    .add(
        reflection_v1,
        interceptor.clone(),
        auth.enabled() && auth.reflection_requires_token(),
    )
    .add(
        reflection_v1alpha,
        interceptor,
        auth.enabled() && auth.reflection_requires_token(),
    );

    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let local = listener.local_addr()?;
    // SIGHUP asks for the reloadable files to be checked at once, beside
    // their periodic checks.
    let (hangup_tx, hangup) = tokio::sync::watch::channel(());
    let hangups = tokio::spawn(forward_hangups(hangup_tx));
    let reload = tls
        .clone()
        .map(|tls| tokio::spawn(tls.watch(metrics.clone(), hangup.clone())));
    let auth_reload = match (&config.config_file, auth.enabled()) {
        (Some(path), true) => Some(tokio::spawn(reload_auth_forever(
            auth.clone(),
            config.auth.clone(),
            path.clone(),
            config.auth_reload_interval,
            metrics.clone(),
            hangup,
        ))),
        _ => None,
    };
    let mut serving: JoinHandle<()> = tokio::spawn(crate::routes::serve(
        crate::tls::incoming(listener, tls, metrics.clone(), config.tcp_keepalive),
        routes,
        config.connections,
        async {
            let _ = drain_rx.await;
        },
    ));
    let expiry = tokio::spawn(expire_forever(
        store.clone(),
        config.expiry_interval,
        config.expiry_batch,
    ));

    if !recovery.is_empty() {
        let started = std::time::Instant::now();
        let count = recovery.records.len();
        let replaying = store.clone();
        tokio::task::spawn_blocking(move || -> Result<(), crate::wal::WalError> {
            if let Some(path) = &recovery.snapshot {
                crate::snapshot::load(&replaying, path)?;
            }
            replaying.recover(recovery.records);
            Ok(())
        })
        .await
        .map_err(|e| std::io::Error::other(format!("recovery failed: {e}")))??;
        tracing::info!(records = count, took = ?started.elapsed(), "recovered the state");
    }
    set_health(&health, &ready, ServingStatus::Serving).await;
    if let Some(on_serving) = on_serving {
        let _ = on_serving.send(());
    }
    tracing::info!(
        addr = %local,
        epoch = store.epoch(),
        shards = config.store.shards,
        tls = config.tls.is_some(),
        mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        principals = config.auth.principals.len(),
        "freshd serving"
    );

    let result = tokio::select! {
        // Serving ended on its own: report it.
        r = &mut serving => Some(r),
        () = shutdown => None,
    };
    expiry.abort();
    if let Some(reload) = reload {
        reload.abort();
    }
    if let Some(reload) = auth_reload {
        reload.abort();
    }
    hangups.abort();
    let result = match result {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(ServeError::Io(std::io::Error::other(format!(
            "the serving task failed: {e}"
        )))),
        None => {
            set_health(&health, &ready, ServingStatus::NotServing).await;
            tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining in-flight requests");
            // Watch streams send a final progress watermark and end.
            store.hub().begin_shutdown();
            let _ = drain_tx.send(());
            match tokio::time::timeout(config.shutdown_grace, &mut serving).await {
                Ok(_) => Ok(()),
                Err(_) => {
                    tracing::warn!(
                        grace = ?config.shutdown_grace,
                        "shutdown grace period ran out; closing the remaining connections"
                    );
                    serving.abort();
                    Ok(())
                }
            }
        }
    };
    if let Some(admin) = admin {
        admin.abort();
    }
    tracing::info!("freshd stopped");
    result
}

async fn set_health(
    health: &tonic_health::server::HealthReporter,
    serving: &AtomicBool,
    status: ServingStatus,
) {
    serving.store(status == ServingStatus::Serving, Ordering::Release);
    health.set_service_status("", status).await;
    health.set_service_status(COORDINATOR_SERVICE, status).await;
}

/// Tells `reload` of every SIGHUP, for as long as it runs. The signal's
/// default action (ending the process) is replaced once any handler is
/// registered, so an operator's `kill -HUP` never stops the server.
#[cfg(unix)]
async fn forward_hangups(reload: tokio::sync::watch::Sender<()>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; files are checked on their intervals only");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP received: checking the TLS files and the principals for changes");
        reload.send_replace(());
    }
}

/// No SIGHUP here: dropping `reload` leaves the reloaders to their
/// intervals ([`tick_or_hangup`]).
#[cfg(not(unix))]
async fn forward_hangups(_reload: tokio::sync::watch::Sender<()>) {}

/// Waits for the next tick of `tick`, or for a SIGHUP forwarded to
/// `hangup`, whichever comes first.
pub(crate) async fn tick_or_hangup(
    tick: &mut tokio::time::Interval,
    hangup: &mut tokio::sync::watch::Receiver<()>,
) {
    tokio::select! {
        _ = tick.tick() => {}
        changed = hangup.changed() => {
            if changed.is_err() {
                // No SIGHUP to forward: ticks only (this branch is
                // ready at once from now on, so wait for the tick).
                tick.tick().await;
            }
        }
    }
}

/// Reads `path` every `interval`, or at once on SIGHUP, and, when its
/// content changed and its principals differ from those `applied` (the
/// startup's, then each reload's), reloads them ([`Auth::reload`]). A file
/// that does not parse, or that would turn authentication off, changes
/// nothing and is counted as an error; the same content is not tried again
/// until it changes.
async fn reload_auth_forever(
    auth: Arc<Auth>,
    mut applied: crate::auth::AuthConfig,
    path: std::path::PathBuf,
    interval: std::time::Duration,
    metrics: Arc<crate::metrics::Metrics>,
    mut hangup: tokio::sync::watch::Receiver<()>,
) {
    let read = |path: std::path::PathBuf| async move {
        // Reading a file blocks.
        tokio::task::spawn_blocking(move || std::fs::read_to_string(&path).ok())
            .await
            .ok()
            .flatten()
    };
    // Compared with what was applied, not with the file as first read
    // here: a change made since startup is not missed.
    let mut known = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick_or_hangup(&mut tick, &mut hangup).await;
        let Some(content) = read(path.clone()).await else {
            continue;
        };
        if known.as_ref() == Some(&content) {
            continue;
        }
        // The content just read is the content parsed.
        let parsed = crate::config::auth_from_text(&path, &content);
        known = Some(content);
        let outcome = match parsed {
            Ok(config) if config == applied => continue,
            Ok(config) => {
                let reloaded = auth.reload(&config);
                if reloaded.is_ok() {
                    applied = config;
                }
                reloaded
            }
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(r) => {
                metrics.auth_reload("ok");
                tracing::info!(
                    file = %path.display(),
                    kept = r.kept,
                    changed = r.changed,
                    added = r.added,
                    removed = r.removed,
                    "reloaded the principals"
                );
            }
            Err(e) => {
                metrics.auth_reload("error");
                tracing::error!(file = %path.display(), error = %e, "cannot reload the principals; keeping the previous ones");
            }
        }
    }
}

/// Sweeps expired registrations: `batch` at a time, back to back while there
/// is a backlog, then every `interval`.
async fn expire_forever(store: Arc<Store>, interval: std::time::Duration, batch: usize) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        while store.expire(batch) == batch {
            tokio::task::yield_now().await;
        }
    }
}

/// A server running in the background, for tests and embedding.
pub struct RunningServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its admin HTTP endpoint listens, if it has one.
    pub admin_addr: Option<SocketAddr>,
    /// Its store.
    pub store: Arc<Store>,
    tls: bool,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl RunningServer {
    /// Binds `config.listen` (port 0 picks a free port) and serves in the
    /// background. The server is ready when this returns.
    pub async fn start(config: Config) -> Result<Self, ServeError> {
        let (store, recovery) = new_store(&config)?;
        Self::start_recovering(config, store, recovery).await
    }

    /// Like [`RunningServer::start`], serving a store built by the caller
    /// (over another [`crate::log::Log`], say).
    pub async fn start_with_store(config: Config, store: Arc<Store>) -> Result<Self, ServeError> {
        Self::start_recovering(config, store, Recovery::default()).await
    }

    async fn start_recovering(
        config: Config,
        store: Arc<Store>,
        recovery: Recovery,
    ) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let admin = match config.admin_listen {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
        let tls = config.tls.is_some();
        let (tx, rx) = oneshot::channel::<()>();
        let (serving_tx, serving_rx) = oneshot::channel::<()>();
        let mut task = tokio::spawn(serve_until(
            config,
            listener,
            admin,
            store.clone(),
            recovery,
            async {
                let _ = rx.await;
            },
            Some(serving_tx),
        ));
        // Ready when this returns: wait until the server serves (recovery
        // done), or report why it stopped before.
        tokio::select! {
            _ = serving_rx => {}
            result = &mut task => {
                return Err(match result {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => ServeError::Io(std::io::Error::other("the server stopped before serving")),
                    Err(e) => ServeError::Io(std::io::Error::other(e.to_string())),
                });
            }
        }
        Ok(Self {
            addr,
            admin_addr,
            store,
            tls,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// `http://addr`, or `https://addr` when it serves TLS, for gRPC
    /// clients.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Begins shutdown and waits for the server to stop.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
