//! Shared pieces of the exporter's integration tests: where the repository, the built
//! `marengo-export` and the CI Python venv are, and how to run them with errors that say what
//! went wrong and how to fix it.

#![allow(dead_code)] // Each test binary compiles this module and uses a different part of it.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

// The workspace's one way to run a helper program in a test, shared with the daemon's tests.
#[path = "../../../tests/support/command.rs"]
mod command;
pub use command::run;

/// The repository root (the workspace holding `export/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("export/ has a parent directory")
        .to_path_buf()
}

/// The CI venv's interpreter. A missing venv fails the test: the reference engine is part of
/// what the test checks, so it must never silently pass without it.
#[track_caller]
pub fn venv_python() -> PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run .ci/python-venv.sh to create the onnxruntime venv the tests need",
        python.display()
    );
    python
}

/// A fresh, empty scratch directory for one test, under cargo's per-target temporary directory.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(test);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Runs the `marengo-export` binary built for this test run.
#[track_caller]
pub fn marengo_export<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run(Command::new(env!("CARGO_BIN_EXE_marengo-export")).args(args))
}

/// `marengo-export synth --config CONFIG --out OUT EXTRA…`: a deterministic random checkpoint.
#[track_caller]
pub fn synth(config: &Path, out: &Path, extra: &[String]) {
    let mut args = vec![
        "synth".into(),
        "--config".into(),
        config.as_os_str().to_owned(),
        "--out".into(),
        out.as_os_str().to_owned(),
    ];
    args.extend(extra.iter().map(Into::into));
    marengo_export(args);
}

/// `marengo-export convert CHECKPOINT --out BUNDLE EXTRA…`.
#[track_caller]
pub fn convert(checkpoint: &Path, bundle: &Path, extra: &[&str]) {
    let mut args = vec![
        "convert".into(),
        checkpoint.as_os_str().to_owned(),
        "--out".into(),
        bundle.as_os_str().to_owned(),
    ];
    args.extend(extra.iter().map(Into::into));
    marengo_export(args);
}

/// Runs `tests/python/<script>` with the CI venv's interpreter and returns its stdout.
#[track_caller]
pub fn python_script<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let path = repo_root().join("tests/python").join(script);
    run(Command::new(venv_python()).arg(path).args(args))
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    format!("{:x}", Sha256::digest(&bytes))
}

/// Raw little-endian f32 values, as `ort_generate.py --logits-out` writes them.
pub fn read_f32_le(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(
        bytes.len() % 4,
        0,
        "{}: length not a multiple of 4",
        path.display()
    );
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Runs `marengo-export` expecting failure; returns its stderr. Panics if it succeeds.
#[track_caller]
pub fn marengo_export_fails<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(env!("CARGO_BIN_EXE_marengo-export"));
    command.args(args);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    assert!(
        !output.status.success(),
        "{command:?} succeeded but should have failed"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The committed tiny config `tests/fixtures/tiny/<name>/config.json`.
pub fn tiny_config(name: &str) -> PathBuf {
    repo_root()
        .join("tests/fixtures/tiny")
        .join(name)
        .join("config.json")
}

/// The committed Mistral-7B v0.1 tokenizer, which fits both tiny configs' 32000-token vocab.
pub fn tokenizer_fixture() -> PathBuf {
    repo_root().join("tests/fixtures/mistral-7b-v0.1/tokenizer.json")
}

/// Synthesizes the tiny checkpoint `name` into `out` with a tokenizer and `extra` synth flags.
#[track_caller]
pub fn tiny_checkpoint(name: &str, out: &Path, extra: &[&str]) {
    let mut args: Vec<String> = vec![
        "--tokenizer".into(),
        tokenizer_fixture().display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    synth(&tiny_config(name), out, &args);
}

/// Entries of a directory, sorted by name.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}
