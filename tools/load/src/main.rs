//! `freshd-load`: drives freshd, Redis or etcd with one workload and prints
//! a summary line per measurement; `--json FILE` appends the full reports
//! (percentiles and CDF series) as JSON lines.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use freshd_load::check::{CheckOpts, RedisBatch, Run};
use freshd_load::deps::DepsOpts;
use freshd_load::fanout::FanoutOpts;
use freshd_load::memory::MemoryOpts;
use freshd_load::notice::NoticeOpts;
use freshd_load::stats::Report;
use freshd_load::Target;

/// jemalloc, as the server uses: the load tool's requests (both peers')
/// allocate, and the system allocator made it the bottleneck of the
/// batched checks before the server was busy.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "freshd-load",
    version,
    about = "Load generator for freshd and its peers"
)]
struct Cli {
    /// Which server to drive.
    #[arg(long, value_enum, global = true, default_value = "freshd")]
    target: Target,
    /// Its host:port.
    #[arg(long, global = true, default_value = "127.0.0.1:50051")]
    addr: String,
    /// Append every report to this file as one JSON line.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    /// A label stored with each JSON report (the suite's case name).
    #[arg(long, global = true)]
    label: Option<String>,
    /// The server's process id: reports then include its CPU time over each
    /// measured window.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand)]
enum Workload {
    /// Version checks: Check/CheckBatch vs GET/MGET/pipelined GET.
    Check {
        /// Connections (closed loop: requests in flight, times --streams).
        #[arg(long, default_value_t = 16)]
        conns: usize,
        /// Closed loop, freshd only: requests in flight on each connection,
        /// as HTTP/2 streams (a gRPC client sharing one channel).
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Keys registered first.
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        /// Measurements as batch@rate, comma-separated; rate 0 = closed loop.
        #[arg(long, default_value = "1@0")]
        runs: String,
        /// How Redis answers batches (each one is a measurement).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "mget,pipeline"
        )]
        redis_batch: Vec<RedisBatch>,
        /// Warm-up seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Measured seconds per measurement.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
    /// Write-to-notice latency at a fixed rate to N subscribers.
    Notice {
        /// Subscribers, one connection each (see --per-conn).
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
        /// Subscribers per connection, for freshd (Watch streams, as
        /// subscribers in one process share a gRPC channel) and the floor.
        #[arg(long, default_value_t = 1)]
        per_conn: usize,
        /// Changes per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Warm-up seconds.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Measured seconds.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
    /// Notices delivered per second to N subscribers (closed-loop writer).
    Fanout {
        /// Subscribers, one connection each.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Keys every freshd subscriber tracks.
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        /// Changes per Publish (Redis: PUBLISHes per pipelined round).
        #[arg(long, default_value_t = 10)]
        per_call: usize,
        /// Warm-up seconds.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Measured seconds.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
    /// One write invalidating D dependents: time until the last notice.
    Deps {
        /// Dependents of the key written.
        #[arg(long, default_value_t = 10_000)]
        dependents: usize,
        /// Subscribers the dependents are split among.
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// Rounds measured.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
    /// Serve the loopback floor (`--target floor`): copy each line a writer
    /// sends to every subscriber's socket, and nothing else. Runs until
    /// killed.
    FloorServer {
        /// The host:port to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Bytes per key of the server with K keys and 4 dependencies each.
    Memory {
        /// Cached keys.
        #[arg(long, default_value_t = 1_000_000)]
        keys: usize,
        /// The server's process id (needed for freshd: its RSS is read).
        #[arg(long)]
        pid: Option<u32>,
        /// Fills in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Workload::FloorServer { listen } = &cli.workload {
        return floor_server(listen);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("load-client")
        .build()
        .expect("tokio runtime");
    if let Some(pid) = cli.server_pid {
        freshd_load::cpu::set_server_pid(pid);
    }
    let (target, addr) = (cli.target, cli.addr.clone());
    let result: Result<Vec<Report>, String> = runtime.block_on(async move {
        match cli.workload {
            Workload::Check {
                conns,
                streams,
                keys,
                runs,
                redis_batch,
                warmup,
                secs,
            } => {
                let runs = runs
                    .split(',')
                    .map(Run::parse)
                    .collect::<Result<Vec<_>, _>>()?;
                let opts = CheckOpts {
                    target,
                    addr,
                    conns,
                    streams,
                    keys,
                    runs,
                    redis_batch,
                    warmup,
                    secs,
                };
                freshd_load::check::run(&opts).await
            }
            Workload::Notice {
                subscribers,
                per_conn,
                rate,
                warmup,
                secs,
            } => {
                let opts = NoticeOpts {
                    target,
                    addr,
                    subscribers,
                    per_conn,
                    rate,
                    warmup,
                    secs,
                };
                freshd_load::notice::run(&opts).await.map(|r| vec![r])
            }
            Workload::Fanout {
                subscribers,
                keys,
                per_call,
                warmup,
                secs,
            } => {
                let opts = FanoutOpts {
                    target,
                    addr,
                    subscribers,
                    keys,
                    per_call,
                    warmup,
                    secs,
                };
                freshd_load::fanout::run(&opts).await.map(|r| vec![r])
            }
            Workload::Deps {
                dependents,
                subscribers,
                rounds,
            } => {
                let opts = DepsOpts {
                    target,
                    addr,
                    dependents,
                    subscribers,
                    rounds,
                };
                freshd_load::deps::run(&opts).await.map(|r| vec![r])
            }
            Workload::FloorServer { .. } => unreachable!("served before the runtime starts"),
            Workload::Memory {
                keys,
                pid,
                concurrency,
            } => {
                let opts = MemoryOpts {
                    target,
                    addr,
                    pid,
                    keys,
                    concurrency,
                };
                freshd_load::memory::run(&opts).await.map(|r| vec![r])
            }
        }
    });
    let reports = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("freshd-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    for r in &reports {
        println!("{}", r.human());
    }
    if let Some(path) = &cli.json {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        let mut file = match file {
            Ok(f) => f,
            Err(e) => {
                eprintln!("freshd-load: cannot open {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        for r in &reports {
            let mut value = serde_json::to_value(r).expect("a report serializes");
            if let Some(label) = &cli.label {
                value["label"] = serde_json::json!(label);
            }
            if let Err(e) = writeln!(file, "{value}") {
                eprintln!("freshd-load: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Serves the loopback floor on `listen`, printing the bound address.
fn floor_server(listen: &str) -> ExitCode {
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("freshd-load: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("floor server listening on {addr}"),
        Err(e) => {
            eprintln!("freshd-load: {e}");
            return ExitCode::FAILURE;
        }
    }
    match freshd_load::floor::serve(listener) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("freshd-load: floor server: {e}");
            ExitCode::FAILURE
        }
    }
}
