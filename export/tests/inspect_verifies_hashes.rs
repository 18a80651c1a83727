//! `marengo-export inspect` shows the manifest and tensor table, and `--verify` catches content
//! that changed without changing size (which `Bundle::open` alone cannot see).

use std::io::{Seek, SeekFrom, Write};

use marengo_testkit::exporter::{convert, marengo_export, marengo_export_fails, tiny_checkpoint};
use marengo_testkit::files::sha256_file;
use marengo_testkit::scratch_dir;

#[test]
fn inspect_lists_tensors_and_verify_catches_a_flipped_byte() {
    let dir = scratch_dir("inspect_verify");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint(
        "mistral-gqa",
        &checkpoint,
        &["--dtype", "bf16", "--shards", "2"],
    );
    let bundle = dir.join("bundle");
    convert(&checkpoint, &bundle, &[]);

    let report = marengo_export(["inspect".as_ref(), bundle.as_os_str(), "--verify".as_ref()]);
    assert!(report.contains("marengo-bundle v1"), "{report}");
    assert!(
        report.contains("model.layers.1.mlp.down_proj.weight_scale"),
        "{report}"
    );
    assert!(report.contains("sha256 of every file verified"), "{report}");
    let digest = sha256_file(&bundle.join("model.weights"));
    assert!(
        report.contains(&digest),
        "the report shows model.weights' digest"
    );

    let mut weights = std::fs::File::options()
        .write(true)
        .open(bundle.join("model.weights"))
        .unwrap();
    weights.seek(SeekFrom::Start(100)).unwrap();
    weights.write_all(&[0x5A]).unwrap();
    drop(weights);

    marengo_export(["inspect".as_ref(), bundle.as_os_str()]);
    let err = marengo_export_fails(["inspect".as_ref(), bundle.as_os_str(), "--verify".as_ref()]);
    assert!(
        err.contains("model.weights") && err.contains("sha256"),
        "{err}"
    );
}

#[test]
fn inspect_refuses_a_directory_that_is_not_a_bundle() {
    let dir = scratch_dir("inspect_not_bundle");
    let err = marengo_export_fails(["inspect".as_ref(), dir.as_os_str()]);
    assert!(err.contains("bundle.json"), "{err}");
}
