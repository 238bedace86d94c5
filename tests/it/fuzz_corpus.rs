//! The fuzz corpora, replayed on stable: every file of `fuzz/corpus/<target>/` goes
//! through the check its fuzz target runs (`spillway::fuzzing`), so the seeds and every
//! finding committed with its fix stay checked in the normal `cargo test`. Running the
//! fuzzer itself is described in `fuzz/README.md`.

use std::{
    collections::BTreeSet,
    fs, panic,
    path::{Path, PathBuf},
};

use spillway::fuzzing;

/// A fuzz target's check: panics when a property fails.
type Check = fn(&[u8]);

/// Every fuzz target with its check: adding a target adds one line here.
const TARGETS: &[(&str, Check)] = &[
    ("config", fuzzing::config),
    ("request_fields", fuzzing::request_fields),
    ("sse", fuzzing::sse),
    ("retry_after", fuzzing::retry_after),
    ("path", fuzzing::path),
];

/// Corpus files known to fail until a fix made elsewhere is merged: target, file, why.
/// Each must still fail, so a fixed one is noticed and removed from this list.
const KNOWN_FAILURES: &[(&str, &str, &str)] = &[];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; a missing or empty directory fails the test.
fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    let entries = fs::read_dir(dir).unwrap_or_else(|error| panic!("corpus {}: {error}", dir.display()));
    let mut files: Vec<PathBuf> =
        entries.map(|entry| entry.expect("corpus entry").path()).filter(|path| path.is_file()).collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} has no files", dir.display());
    files
}

#[test]
fn every_corpus_file_passes_its_targets_check() {
    let mut failed = Vec::new();
    for &(target, check) in TARGETS {
        for path in corpus_files(&fuzz_dir().join("corpus").join(target)) {
            let input = fs::read(&path).expect("read corpus file");
            let passed = panic::catch_unwind(|| check(&input)).is_ok();
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            let known = KNOWN_FAILURES.iter().any(|&(t, file, _)| (t, file) == (target, name));
            match (passed, known) {
                (false, false) => failed.push(format!("{target}/{name} fails (its panic is printed above)")),
                (true, true) => {
                    failed.push(format!("{target}/{name} passes now: remove it from KNOWN_FAILURES"))
                }
                _ => {}
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn known_failures_name_corpus_files() {
    for &(target, file, why) in KNOWN_FAILURES {
        let path = fuzz_dir().join("corpus").join(target).join(file);
        assert!(path.is_file(), "{} is listed as a known failure ({why}) but does not exist", path.display());
    }
}

/// Every target in `fuzz/fuzz_targets/` is declared in `fuzz/Cargo.toml` and replayed
/// here, and every replayed target is one.
#[test]
fn every_fuzz_target_is_declared_and_replayed() {
    let sources: BTreeSet<String> = fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|entry| entry.expect("fuzz target entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "rs"))
        .filter_map(|path| Some(path.file_stem()?.to_str()?.to_owned()))
        .collect();
    let replayed: BTreeSet<String> = TARGETS.iter().map(|&(target, _)| target.to_owned()).collect();
    assert_eq!(sources, replayed, "fuzz/fuzz_targets/*.rs against TARGETS");
    let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for target in &sources {
        let declared = format!("name = \"{target}\"\npath = \"fuzz_targets/{target}.rs\"");
        assert!(manifest.contains(&declared), "fuzz/Cargo.toml has no [[bin]] for {target}");
    }
}
