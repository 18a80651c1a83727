//! An export either produces a complete bundle at the target or nothing there: a full disk, a
//! killed exporter or an existing bundle never leave a half-written directory that looks like one.

use std::path::Path;
use std::process::Command;

use marengo_testkit::exporter::{convert, marengo_export, marengo_export_fails, tiny_checkpoint};
use marengo_testkit::files::{dir_entries, sha256_file};
use marengo_testkit::scratch_dir;

/// Runs `convert` under `ulimit -f` (in 512-byte blocks) so that writing `model.weights` runs
/// into the limit. With `ignore_signal`, the write fails with EFBIG as on a full disk; without,
/// SIGXFSZ kills the exporter mid-write, as an interruption would.
fn convert_with_file_size_limit(checkpoint: &Path, bundle: &Path, ignore_signal: bool) -> bool {
    let trap = if ignore_signal { "trap '' XFSZ; " } else { "" };
    let script = format!("{trap}ulimit -f 2000; exec \"$0\" convert \"$1\" --out \"$2\"");
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_marengo-export"))
        .arg(checkpoint)
        .arg(bundle)
        .status()
        .expect("running sh")
        .success()
}

fn partial_dirs(parent: &Path) -> Vec<String> {
    dir_entries(parent)
        .into_iter()
        .filter(|n| n.contains(".partial-"))
        .collect()
}

#[test]
fn a_full_disk_leaves_nothing_behind() {
    let dir = scratch_dir("full_disk");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("mistral-gqa", &checkpoint, &["--dtype", "bf16"]);
    let bundle = dir.join("out").join("bundle");
    std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
    assert!(!convert_with_file_size_limit(&checkpoint, &bundle, true));
    assert!(!bundle.exists());
    assert_eq!(partial_dirs(bundle.parent().unwrap()), Vec::<String>::new());
}

#[test]
fn an_interrupted_export_leaves_no_bundle() {
    let dir = scratch_dir("interrupted");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("mistral-gqa", &checkpoint, &["--dtype", "bf16"]);
    let bundle = dir.join("bundle");
    assert!(!convert_with_file_size_limit(&checkpoint, &bundle, false));
    assert!(
        !bundle.exists(),
        "a killed export must not leave {}",
        bundle.display()
    );
    // What remains is hidden and cannot be mistaken for the bundle.
    for leftover in partial_dirs(&dir) {
        assert!(leftover.starts_with(".bundle.partial-"), "{leftover}");
        assert!(!dir.join(&leftover).join("bundle.json").exists());
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
