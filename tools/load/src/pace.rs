//! Open-loop pacing: a schedule of intended send times at a fixed rate,
//! independent of how fast the target answers.
//!
//! A dedicated thread walks the schedule (`start + i / rate`), sleeping with
//! `thread::sleep` (tens of microseconds of precision, where tokio's timer
//! has one millisecond), and hands each tick to a connection's queue in turn.
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
    std::thread::Builder::new()
        .name("load-pacer".into())
        .spawn(move || {
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
                if at > now {
                    std::thread::sleep(at - now);
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
