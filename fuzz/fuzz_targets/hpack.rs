//! Fuzzes `freshd::fuzzing::hpack`; see `fuzz/README.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| freshd::fuzzing::hpack(data));
