//! Fuzzes `freshd::fuzzing::log_segment`; see `fuzz/README.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| freshd::fuzzing::log_segment(data));
