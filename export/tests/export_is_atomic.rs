//! An export either produces a complete bundle at the target or nothing there: a full disk, a
//! killed exporter or an existing bundle never leave a half-written directory that looks like one.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use marengo_testkit::exporter::{
    convert, marengo_export, marengo_export_fails, tiny_checkpoint, tokenizer_fixture,
};
use marengo_testkit::files::{dir_entries, sha256_file};
use marengo_testkit::scratch_dir;

/// Linux's signal number for "file size limit exceeded" (the same on x86-64 and arm64).
const SIGXFSZ: i32 = 25;

/// A file size limit above every file of a tiny bundle but `model.weights`: the tokenizer
/// fixture (3.5 MB, the largest of the others) fits, the weights of the bf16 `mistral-gqa`
/// checkpoint (7 MB) do not. In bytes, a multiple of `ulimit -f`'s 512-byte blocks.
fn limit_between_tokenizer_and_weights() -> u64 {
    let tokenizer = std::fs::metadata(tokenizer_fixture())
        .expect("tokenizer fixture")
        .len();
    (tokenizer / 512 + 128) * 512
}

/// Runs `convert` under `ulimit -f` so that writing `model.weights` runs into the limit. With
/// `ignore_signal`, the write fails with EFBIG as on a full disk; without, SIGXFSZ kills the
/// exporter mid-write, as an interruption would. The shell `exec`s the exporter, so the status
/// is the exporter's own.
fn convert_with_file_size_limit(
    checkpoint: &Path,
    bundle: &Path,
    limit: u64,
    ignore_signal: bool,
) -> Output {
    let trap = if ignore_signal { "trap '' XFSZ; " } else { "" };
    let blocks = limit / 512;
    let script = format!("{trap}ulimit -f {blocks}; exec \"$0\" convert \"$1\" --out \"$2\"");
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_marengo-export"))
        .arg(checkpoint)
        .arg(bundle)
        .output()
        .expect("running sh")
}

fn partial_dirs(parent: &Path) -> Vec<String> {
    dir_entries(parent)
        .into_iter()
        .filter(|n| n.contains(".partial-"))
        .collect()
}

/// The file an error message says could not be written: the text between `parent` and
/// `: File too large` (EFBIG's message).
fn file_too_large(stderr: &str, parent: &Path) -> Option<PathBuf> {
    let parent = parent.to_str().expect("UTF-8 scratch path");
    let line = stderr.lines().find(|l| l.contains(": File too large"))?;
    let start = line.find(parent)?;
    let end = line[start..].find(": File too large")? + start;
    Some(PathBuf::from(&line[start..end]))
}

#[test]
fn a_full_disk_leaves_nothing_behind() {
    let dir = scratch_dir("full_disk");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("mistral-gqa", &checkpoint, &["--dtype", "bf16"]);
    let out = dir.join("out");
    let bundle = out.join("bundle");
    std::fs::create_dir_all(&out).unwrap();
    let output = convert_with_file_size_limit(
        &checkpoint,
        &bundle,
        limit_between_tokenizer_and_weights(),
        true,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(
        output.status.code(),
        Some(1),
        "the exporter reports the error and exits ({:?}):\n{stderr}",
        output.status
    );
    // The exporter was writing the weights inside a hidden staging directory when the disk
    // filled up: that directory existed during the export, and the error says so.
    let failed = file_too_large(&stderr, &out).unwrap_or_else(|| {
        panic!(
            "no EFBIG (\"File too large\") error under {}:\n{stderr}",
            out.display()
        )
    });
    assert_eq!(
        failed.file_name().and_then(|n| n.to_str()),
        Some("model.weights"),
        "{stderr}"
    );
    let staging = failed.parent().expect("the weights' directory");
    assert_eq!(staging.parent(), Some(out.as_path()), "{stderr}");
    let staging_name = staging.file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert!(staging_name.starts_with(".bundle.partial-"), "{stderr}");
    // Afterwards: no bundle, and the staging directory is gone.
    assert!(!bundle.exists());
    assert!(!staging.exists(), "{} was left behind", staging.display());
    assert_eq!(partial_dirs(&out), Vec::<String>::new());
}

#[test]
fn an_interrupted_export_leaves_no_bundle() {
    let dir = scratch_dir("interrupted");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("mistral-gqa", &checkpoint, &["--dtype", "bf16"]);
    let bundle = dir.join("bundle");
    let limit = limit_between_tokenizer_and_weights();
    let output = convert_with_file_size_limit(&checkpoint, &bundle, limit, false);
    assert!(!output.status.success());
    assert_eq!(
        output.status.signal(),
        Some(SIGXFSZ),
        "the exporter dies of SIGXFSZ ({:?}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !bundle.exists(),
        "a killed export must not leave {}",
        bundle.display()
    );
    // A killed exporter cannot clean up: its staging directory stays, hidden, cannot be
    // mistaken for the bundle, and holds the weights cut at the limit, which shows that they
    // were being written there and not at the target.
    let leftovers = partial_dirs(&dir);
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    for leftover in leftovers {
        assert!(leftover.starts_with(".bundle.partial-"), "{leftover}");
        let staging = dir.join(&leftover);
        assert!(!staging.join("bundle.json").exists());
        let weights = std::fs::metadata(staging.join("model.weights"))
            .unwrap_or_else(|e| panic!("{leftover}/model.weights: {e}"));
        assert_eq!(weights.len(), limit, "{leftover}/model.weights");
    }
}

#[test]
fn an_existing_bundle_is_replaced_only_with_force() {
    let dir = scratch_dir("replace");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("llama-tied", &checkpoint, &["--dtype", "f32"]);
    let bundle = dir.join("bundle");
    convert(&checkpoint, &bundle, &["--dtype", "f32"]);
    let before = sha256_file(&bundle.join("model.weights"));

    let err = marengo_export_fails([
        "convert".as_ref(),
        checkpoint.as_os_str(),
        "--out".as_ref(),
        bundle.as_os_str(),
    ]);
    assert!(
        err.contains("--force") && err.contains("not empty"),
        "{err}"
    );
    assert_eq!(sha256_file(&bundle.join("model.weights")), before);

    convert(&checkpoint, &bundle, &["--force"]);
    assert_ne!(sha256_file(&bundle.join("model.weights")), before);
    marengo_export(["inspect".as_ref(), bundle.as_os_str(), "--verify".as_ref()]);
    assert_eq!(dir_entries(&dir), vec!["bundle", "checkpoint"]);
}

#[test]
fn an_empty_target_directory_is_filled() {
    let dir = scratch_dir("empty_target");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("llama-tied", &checkpoint, &["--dtype", "f32"]);
    let bundle = dir.join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    convert(&checkpoint, &bundle, &[]);
    assert_eq!(
        dir_entries(&bundle),
        vec![
            "bundle.json",
            "model.onnx",
            "model.weights",
            "tokenizer.json"
        ]
    );
}
