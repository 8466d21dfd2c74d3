//! Integration tests: real freshd servers on loopback port 0, real gRPC
//! clients. One binary, one module per area.

mod concurrency;
mod durability;
mod errors;
mod fuzz_smoke;
mod harness;
mod hostile;
mod metrics;
mod ops;
mod policies;
mod routing;
mod rpc;
mod security;
mod watch;
