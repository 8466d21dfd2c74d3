//! CPU time of the server process over a measured window, read from
//! `/proc/<pid>/stat`, when the server's process id is known
//! ([`set_server_pid`]). It tells what an operation costs the server,
//! which moves less with other work on the machine than throughput does.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static SERVER_PID: OnceLock<u32> = OnceLock::new();

/// Names the server process whose CPU time reports include.
pub fn set_server_pid(pid: u32) {
    let _ = SERVER_PID.set(pid);
}

/// User + system CPU time of process `pid` so far.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after `(comm)`, which may hold spaces: utime is field 14,
    // stime 15, in clock ticks (100 per second on Linux).
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The server's CPU seconds between `from` and `until`, read by a task that
/// sleeps until each instant; `None` without a server pid.
pub fn window(from: Instant, until: Instant) -> tokio::task::JoinHandle<Option<f64>> {
    tokio::spawn(async move {
        let pid = *SERVER_PID.get()?;
        tokio::time::sleep_until(from.into()).await;
        let (t0, c0) = (Instant::now(), process_cpu(pid)?);
        tokio::time::sleep_until(until.into()).await;
        let (t1, c1) = (Instant::now(), process_cpu(pid)?);
        // Scaled to the window's length, in case a read came late.
        let wall = (t1 - t0).as_secs_f64();
        let window = (until - from).as_secs_f64();
        Some((c1 - c0).as_secs_f64() * if wall > 0.0 { window / wall } else { 1.0 })
    })
}

/// The server's CPU time at `from`, read by a task that sleeps until then;
/// `None` without a server pid. With [`since`], for windows whose end is
/// not known in advance.
pub fn mark_at(from: Instant) -> tokio::task::JoinHandle<Option<(Instant, Duration)>> {
    tokio::spawn(async move {
        let pid = *SERVER_PID.get()?;
        tokio::time::sleep_until(from.into()).await;
        Some((Instant::now(), process_cpu(pid)?))
    })
}

/// CPU seconds and wall seconds from a [`mark_at`] mark until now.
pub fn since(mark: Option<(Instant, Duration)>) -> Option<(f64, f64)> {
    let (at, cpu) = mark?;
    let now = process_cpu(*SERVER_PID.get()?)?;
    Some(((now - cpu).as_secs_f64(), at.elapsed().as_secs_f64()))
}
