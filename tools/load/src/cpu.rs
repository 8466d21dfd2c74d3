//! CPU time of the server process over a measured window, read from
//! `/proc` when the server's process id is known ([`set_server_pid`]). It
//! tells what an operation costs the server, which moves less with other
//! work on the machine than throughput does. The load tool's own CPU time
//! over the same window is read beside it: a load generator that is itself
//! saturated measures itself.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static SERVER_PID: OnceLock<u32> = OnceLock::new();

/// Names the server process whose CPU time reports include.
pub fn set_server_pid(pid: u32) {
    let _ = SERVER_PID.set(pid);
}

/// CPU time of process `pid` so far, to the nanosecond: its CPU-time clock
/// ([`clock`]), or where that cannot be read, its user + system time in
/// clock ticks ([`ticks`]). Ticks are 10 ms: a server that works 5 ms in a
/// window of six seconds (the floor at 20 writes/s) reads as 0 or 10 ms of
/// them.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    clock(pid).or_else(|| ticks(pid))
}

/// The CPU-time clock of process `pid` (`clock_getcpuclockid`): the time
/// all its threads have run, those that ended included, in nanoseconds.
pub fn clock(pid: u32) -> Option<Duration> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut id: libc::clockid_t = 0;
    // SAFETY: `id` is a valid place for the call to write a clock id to.
    if unsafe { libc::clock_getcpuclockid(pid, &mut id) } != 0 {
        return None;
    }
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to write.
    if unsafe { libc::clock_gettime(id, &mut now) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(now.tv_sec).ok()?,
        u32::try_from(now.tv_nsec).ok()?,
    ))
}

/// User + system CPU time of process `pid` so far, from `/proc/<pid>/stat`,
/// in clock ticks (10 ms each; every Linux the suite runs on has 100 a
/// second). Threads that ended count too.
pub fn ticks(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after `(comm)`, which may hold spaces: utime is field 14,
    // stime 15.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU seconds used over a measured window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Used {
    /// By the server; `None` without a server pid.
    pub server_s: Option<f64>,
    /// By this load tool, all of its threads: near one core busy (it is
    /// pinned to one in the suite) the figures measure the load generator as
    /// much as the server.
    pub load_s: Option<f64>,
}

fn both() -> (Option<Duration>, Option<Duration>) {
    (
        SERVER_PID.get().and_then(|pid| process_cpu(*pid)),
        process_cpu(std::process::id()),
    )
}

fn delta(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    Some(b?.checked_sub(a?)?.as_secs_f64())
}

/// The CPU seconds used between `from` and `until`, read by a task that
/// sleeps until each instant.
pub fn window(from: Instant, until: Instant) -> tokio::task::JoinHandle<Used> {
    tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let (t0, (s0, l0)) = (Instant::now(), both());
        tokio::time::sleep_until(until.into()).await;
        let (t1, (s1, l1)) = (Instant::now(), both());
        // Scaled to the window's length, in case a read came late.
        let wall = (t1 - t0).as_secs_f64();
        let scale = if wall > 0.0 {
            (until - from).as_secs_f64() / wall
        } else {
            1.0
        };
        Used {
            server_s: delta(s0, s1).map(|s| s * scale),
            load_s: delta(l0, l1).map(|s| s * scale),
        }
    })
}

/// The CPU times read at one instant, for [`since`]: a window whose end is
/// not known in advance.
pub struct Mark {
    at: Instant,
    server: Option<Duration>,
    load: Option<Duration>,
}

/// Reads the CPU times at `from`, in a task that sleeps until then; see
/// [`since`].
pub fn mark_at(from: Instant) -> tokio::task::JoinHandle<Mark> {
    tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let (server, load) = both();
        Mark {
            at: Instant::now(),
            server,
            load,
        }
    })
}

/// CPU seconds used from a [`mark_at`] mark until now, and the wall seconds
/// between them.
pub fn since(mark: &Mark) -> (Used, f64) {
    let (server, load) = both();
    (
        Used {
            server_s: delta(mark.server, server),
            load_s: delta(mark.load, load),
        },
        mark.at.elapsed().as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins for `d` of wall time on this thread.
    fn spin(d: Duration) {
        let until = Instant::now() + d;
        let mut x = 0u64;
        while Instant::now() < until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    /// The CPU time of the calling thread.
    fn this_thread() -> Duration {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to write.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) },
            0
        );
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    }

    #[test]
    fn the_clock_counts_the_time_of_threads_that_ended() {
        let pid = std::process::id();
        let before = clock(pid).expect("the CPU-time clock reads");
        // All of this thread's time falls within the window, and it ends
        // before the window's second reading.
        let ended = std::thread::spawn(|| {
            spin(Duration::from_millis(3));
            this_thread()
        })
        .join()
        .unwrap();
        let used = clock(pid).unwrap() - before;
        assert!(ended > Duration::ZERO);
        assert!(
            used >= ended,
            "the process's clock moved {used:?}, less than the {ended:?} of a thread that ended"
        );
        assert!(process_cpu(pid).is_some());
        assert_eq!(clock(u32::MAX), None);
    }

    #[test]
    fn ticks_read_this_process() {
        let pid = std::process::id();
        let t = ticks(pid).expect("/proc/self/stat parses");
        assert_eq!(t.as_millis() % 10, 0, "{t:?} is whole ticks");
        assert_eq!(ticks(u32::MAX), None);
    }
}
