//! A bounded smoke run of the fuzz targets (see `fuzz/README.md`) on stable
//! Rust: every checked-in corpus input, then a fixed-seed stream of random
//! bytes, mutations and valid encodings. An entry point panics when an
//! invariant breaks; the failing input is written out for `cargo fuzz run`.
//!
//! `FRESHD_WRITE_CORPUS=1` rewrites the generated seeds under `fuzz/corpus/`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use freshd::fuzzing::{generate, TARGETS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Runs `entry` on `input`; on a panic, saves the input and fails naming it.
fn run(target: &str, entry: fn(&[u8]), input: &[u8], what: &str) {
    let result = std::panic::catch_unwind(|| entry(input));
    if result.is_err() {
        let path = std::env::temp_dir().join(format!("freshd-fuzz-{target}-crash"));
        std::fs::write(&path, input).expect("saving the failing input");
        panic!(
            "fuzz target {target} failed on {what} ({} bytes), saved to {}; \
             reproduce with `cargo +nightly fuzz run {target} {}`",
            input.len(),
            path.display(),
            path.display()
        );
    }
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("a directory entry").path();
            let name = path
                .file_name()
                .expect("a name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("a corpus file"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_target_has_its_seed_corpus() {
    let write = std::env::var_os("FRESHD_WRITE_CORPUS").is_some();
    for (target, _) in TARGETS {
        let dir = corpus_dir(target);
        for (i, seed) in generate::seeds(target).iter().enumerate() {
            let path = dir.join(format!("seed-{i:02}"));
            if write {
                std::fs::create_dir_all(&dir).expect("creating the corpus directory");
                std::fs::write(&path, seed).expect("writing a seed");
            }
            assert!(
                path.exists(),
                "{} is missing: run FRESHD_WRITE_CORPUS=1 cargo test --test it fuzz_smoke",
                path.display()
            );
        }
    }
}

/// Runs `target` over its corpus, then over `inputs` generated inputs.
fn smoke(target: &str, inputs: usize) {
    let entry = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, entry)| *entry)
        .expect("a fuzz target");
    let start = Instant::now();
    let corpus = corpus(target);
    assert!(!corpus.is_empty(), "no corpus for {target}");
    for (name, input) in &corpus {
        run(target, entry, input, &format!("corpus file {name}"));
    }
    let seeds: Vec<Vec<u8>> = corpus.into_iter().map(|(_, b)| b).collect();
    let mut rng = StdRng::seed_from_u64(0xf022 ^ target.len() as u64);
    for i in 0..inputs {
        let input = match i % 4 {
            0 => generate::bytes(&mut rng, 64),
            1 => generate::valid(&mut rng, target),
            2 => {
                let a = &seeds[rng.random_range(0..seeds.len())];
                let b = &seeds[rng.random_range(0..seeds.len())];
                generate::mutate(&mut rng, a, b)
            }
            _ => {
                let a = generate::valid(&mut rng, target);
                let b = generate::valid(&mut rng, target);
                generate::mutate(&mut rng, &a, &b)
            }
        };
        run(target, entry, &input, &format!("generated input {i}"));
    }
    eprintln!(
        "fuzz smoke: {target}: {} corpus files and {inputs} generated inputs in {:?}",
        seeds.len(),
        start.elapsed()
    );
}

#[test]
fn fuzz_smoke_request() {
    // Each input sets up two stores: fewer of them.
    smoke("request", 5_000);
}

#[test]
fn fuzz_smoke_log_segment() {
    smoke("log_segment", 10_000);
}

#[test]
fn fuzz_smoke_snapshot() {
    smoke("snapshot", 10_000);
}

#[test]
fn fuzz_smoke_hpack() {
    smoke("hpack", 20_000);
}

#[test]
fn fuzz_smoke_http2() {
    smoke("http2", 20_000);
}

#[test]
fn every_target_has_a_smoke_test() {
    let names: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        ["request", "log_segment", "snapshot", "hpack", "http2"]
    );
}
