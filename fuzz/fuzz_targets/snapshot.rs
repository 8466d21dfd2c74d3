//! Fuzzes `freshd::fuzzing::snapshot`; see `fuzz/README.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| freshd::fuzzing::snapshot(data));
