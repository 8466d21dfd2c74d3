//! Open-loop pacing: a schedule of intended send times at a fixed rate,
//! independent of how fast the target answers.
//!
//! A dedicated thread walks the schedule (`start + i / rate`), sleeping with
//! `thread::sleep` (tens of microseconds of precision, where tokio's timer
//! has one millisecond) and spinning the last stretch to each tick (at most
//! 200 µs), and hands each tick to a connection's queue in turn.
//! A tick carries its intended time: latency is measured from it, so a
//! sender that falls behind, or a target that stalls, shows in the
//! percentiles instead of slowing the schedule down (no coordinated
//! omission).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// One scheduled operation.
#[derive(Clone, Copy, Debug)]
pub struct Tick {
    /// Its number in the schedule, from 0.
    pub index: u64,
    /// When it is meant to be sent.
    pub intended: Instant,
}

/// How long before a tick the pacer stops sleeping and spins, at most: a
/// sleep ends late by the wake-up of an idle core (tens of microseconds
/// here), and every latency measured from the intended time would carry
/// that. The spin takes at most a twentieth of the interval between ticks.
const SPIN: Duration = Duration::from_micros(200);

/// Shortens the calling thread's timer slack to a nanosecond (Linux; 50 µs
/// by default, by which a sleep may end later still).
fn precise_sleeps() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes a value and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// The intended time of tick `index` at `rate` per second from `start`.
pub fn intended(start: Instant, rate: f64, index: u64) -> Instant {
    start + Duration::from_secs_f64(index as f64 / rate)
}

/// Starts the pacer thread: ticks at `rate` per second from `start` until
/// `end` (exclusive), or `limit` ticks if that comes first, dealt round-robin
/// to `queues`. Returns the thread, which answers how many ticks it sent.
pub fn spawn(
    rate: f64,
    start: Instant,
    end: Instant,
    limit: Option<u64>,
    queues: Vec<mpsc::UnboundedSender<Tick>>,
) -> std::thread::JoinHandle<u64> {
    assert!(rate > 0.0, "the rate must be positive");
    assert!(!queues.is_empty(), "at least one queue");
    let spin = SPIN.min(Duration::from_secs_f64(1.0 / rate / 20.0));
    std::thread::Builder::new()
        .name("load-pacer".into())
        .spawn(move || {
            precise_sleeps();
            let mut index = 0u64;
            loop {
                if limit.is_some_and(|l| index >= l) {
                    break;
                }
                let at = intended(start, rate, index);
                if at >= end {
                    break;
                }
                let now = Instant::now();
                if at > now + spin {
                    std::thread::sleep(at - spin - now);
                }
                while Instant::now() < at {
                    std::hint::spin_loop();
                }
                let queue = &queues[(index % queues.len() as u64) as usize];
                if queue
                    .send(Tick {
                        index,
                        intended: at,
                    })
                    .is_err()
                {
                    break;
                }
                index += 1;
            }
            index
        })
        .expect("spawn the pacer thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tick comes in order, none before its intended time, and the
    /// pacer stops at its limit.
    #[test]
    fn ticks_come_in_order_and_never_early() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let start = Instant::now() + Duration::from_millis(5);
        let rate = 2_000.0;
        let pacer = spawn(
            rate,
            start,
            start + Duration::from_secs(60),
            Some(50),
            vec![tx],
        );
        let mut got = Vec::new();
        while let Some(tick) = rx.blocking_recv() {
            assert!(
                Instant::now() >= tick.intended,
                "tick {} came early",
                tick.index
            );
            assert_eq!(tick.intended, intended(start, rate, tick.index));
            got.push(tick.index);
        }
        assert_eq!(pacer.join().unwrap(), 50);
        assert_eq!(got, (0..50).collect::<Vec<_>>());
    }
}
