//! The `freshd` binary: settings -> config -> serve -> wait for a signal.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use freshd::config::{Args, Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// jemalloc (the `jemalloc` feature, on by default): fewer bytes per key
/// and cheaper requests than the system allocator (docs/benchmarks.md).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a configuration error (EX_CONFIG-like usage error).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.new_token {
        let token = freshd::auth::new_token();
        println!("token:        {token}");
        println!("token_sha256: {}", freshd::auth::hash_token(&token));
        println!();
        println!("# Give the token to the client; put only its hash in the configuration:");
        println!("# [[auth.principals]]");
        println!("# name = \"my-service\"");
        println!("# token_sha256 = \"{}\"", freshd::auth::hash_token(&token));
        println!("# scopes = {{ mynamespace = [\"check\", \"watch\", \"fill\"] }}");
        return ExitCode::SUCCESS;
    }
    if args.hash_token {
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_err() || line.trim().is_empty() {
            eprintln!("freshd: --hash-token reads one token from standard input");
            return ExitCode::from(EXIT_CONFIG);
        }
        println!("{}", freshd::auth::hash_token(line.trim()));
        return ExitCode::SUCCESS;
    }
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("freshd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(config.log_format);
    if let Some(tls) = &config.tls {
        // Refuse bad certificate files as the configuration errors they are.
        if let Err(e) = freshd::tls::load(tls) {
            eprintln!("freshd: invalid TLS setting: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("freshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM and SIGINT");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(addr = %config.listen, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        match freshd::server::serve(config, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "freshd failed");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Watches SIGTERM and SIGINT from now on (the handlers are installed before
/// this returns, so a signal that arrives while the server starts is not
/// lost); the future completes on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // SIGHUP means "check the files" (the server watches it once serving):
    // registered now, it no longer ends the process, even while it starts.
    drop(signal(SignalKind::hangup())?);
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
