//! Fuzzes `freshd::fuzzing::http2`; see `fuzz/README.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| freshd::fuzzing::http2(data));
