//! `marengo-export merge` gives mergekit's merged weights bit for bit, for the committed
//! references that mergekit 0.1.5 made (`tests/python/make_merge_refs.py`): a constant t, a
//! filtered gradient over five layers, two slices pairing different layers with float16
//! output, and a pair whose largest tensors span two of mergekit's chunks. `convert --merge`
//! gives the same bundle as converting the written merge.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use marengo_testkit::exporter::{convert, marengo_export, synth};
use marengo_testkit::files::{dir_entries, sha256_file};
use marengo_testkit::{repo_root, scratch_dir};
use safetensors::SafeTensors;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/merge")
}

/// Every tensor of a checkpoint directory's safetensors files: name → (dtype, shape, bytes).
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for name in dir_entries(dir) {
        if name.ends_with(".safetensors") {
            out.extend(tensors_of_file(&dir.join(name)));
        }
    }
    out
}

fn tensors_of_file(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let file = SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{} is not safetensors: {e}", path.display()));
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = format!("{:?}", view.dtype());
            (name, (dtype, view.shape().to_vec(), view.data().to_vec()))
        })
        .collect()
}

/// How far apart two 16-bit float encodings are, in units in the last place.
fn ulps(a: [u8; 2], b: [u8; 2]) -> i32 {
    let ordered = |x: [u8; 2]| {
        let bits = i32::from(u16::from_le_bytes(x));
        if bits & 0x8000 != 0 {
            0x8000 - bits
        } else {
            bits
        }
    };
    (ordered(a) - ordered(b)).abs()
}

/// Asserts two checkpoints hold the same tensors with the same bits; on failure says how many
/// elements differ and by how many ulps at most.
#[track_caller]
fn assert_same_tensors(
    ours: &BTreeMap<String, (String, Vec<usize>, Vec<u8>)>,
    reference: &BTreeMap<String, (String, Vec<usize>, Vec<u8>)>,
) {
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    let mut report = Vec::new();
    for (name, (dtype, shape, bytes)) in reference {
        let (our_dtype, our_shape, our_bytes) = &ours[name];
        assert_eq!(
            (our_dtype, our_shape),
            (dtype, shape),
            "{name}: dtype and shape"
        );
        if our_bytes != bytes {
            let (mut differing, mut worst) = (0, 0);
            for (a, b) in our_bytes.chunks_exact(2).zip(bytes.chunks_exact(2)) {
                if a != b {
                    differing += 1;
                    worst = worst.max(ulps([a[0], a[1]], [b[0], b[1]]));
                }
            }
            report.push(format!(
                "{name}: {differing} of {} elements differ, at most {worst} ulp",
                bytes.len() / 2
            ));
        }
    }
    assert!(report.is_empty(), "not bit-exact:\n{}", report.join("\n"));
}

fn config_value<'a>(config: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| config.get(*k))
}

#[track_caller]
fn merge_case(case: &str) {
    let out = scratch_dir(&format!("merge_{case}")).join("merged");
    let dir = fixtures().join(case);
    marengo_export([
        "merge".as_ref(),
        "--config".as_ref(),
        dir.join("slerp.yml").as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let reference = tensors_of_file(&dir.join("expected.safetensors"));
    assert_same_tensors(&tensors(&out), &reference);

    let read = |path: &Path| -> Value {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let ours = read(&out.join("config.json"));
    let theirs = read(&dir.join("expected-config.json"));
    for keys in [&["num_hidden_layers"][..], &["dtype", "torch_dtype"]] {
        assert_eq!(
            config_value(&ours, keys),
            config_value(&theirs, keys),
            "config.json {keys:?}"
        );
    }
    let parent_a = fixtures().join("parent-a");
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            sha256_file(&out.join(file)),
            sha256_file(&parent_a.join(file)),
            "{file} is the base model's"
        );
    }
    assert!(out.join("mergekit_config.yml").is_file());
}

#[test]
fn constant_t_matches_mergekit() {
    merge_case("constant-t");
}

#[test]
fn filtered_gradient_over_five_layers_matches_mergekit() {
    merge_case("filter-gradient");
}

#[test]
fn two_slices_with_float16_output_match_mergekit() {
    merge_case("two-slices");
}

/// Parents regenerated with synth (as the reference script made them); mergekit's tensors are
/// committed as digests. The embedding and LM head (1.28M elements) take mergekit's two-chunk
/// norms and dot products.
#[test]
fn tensors_over_two_chunks_match_mergekit() {
    let dir = scratch_dir("merge_chunked");
    let config = fixtures().join("chunked-mistral.json");
    for (name, seed) in [("parent-a", "1"), ("parent-b", "2")] {
        synth(
            &config,
            &dir.join(name),
            &[
                "--seed".into(),
                seed.into(),
                "--dtype".into(),
                "bf16".into(),
            ],
        );
    }
    std::fs::copy(fixtures().join("chunked/slerp.yml"), dir.join("slerp.yml"))
        .expect("copy config");
    let out = dir.join("merged");
    marengo_export([
        "merge".as_ref(),
        "--config".as_ref(),
        dir.join("slerp.yml").as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let expected: BTreeMap<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chunked/expected.json")).expect("expected.json"),
    )
    .expect("expected.json is JSON");
    let ours = tensors(&out);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    let mut chunked = 0;
    for (name, want) in &expected {
        let (_, shape, bytes) = &ours[name];
        assert_eq!(
            serde_json::to_value(shape).expect("shape"),
            want["shape"],
            "{name}: shape"
        );
        assert_eq!(
            format!("{:x}", Sha256::digest(bytes)),
            want["sha256"].as_str().expect("sha256"),
            "{name}: not mergekit's bits"
        );
        if shape.iter().product::<usize>() > 1 << 20 {
            chunked += 1;
        }
    }
    assert_eq!(chunked, 2, "embedding and LM head span two chunks");
}

/// Sharded output reads back as the same tensors, and `convert --merge` (no checkpoint
/// written) makes the same bundle weights as converting the written checkpoint.
#[test]
fn streamed_convert_equals_written_merge() {
    let dir = scratch_dir("merge_streamed");
    let yaml = fixtures().join("filter-gradient/slerp.yml");
    let sharded = dir.join("sharded");
    marengo_export([
        "merge".as_ref(),
        "--config".as_ref(),
        yaml.as_os_str(),
        "--out".as_ref(),
        sharded.as_os_str(),
        "--shard-size".as_ref(),
        "40000".as_ref(),
    ]);
    let shards = dir_entries(&sharded)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .count();
    assert!(shards >= 3, "{shards} shards");
    assert!(sharded.join("model.safetensors.index.json").is_file());
    assert_same_tensors(
        &tensors(&sharded),
        &tensors_of_file(&fixtures().join("filter-gradient/expected.safetensors")),
    );

    let from_checkpoint = dir.join("bundle-from-checkpoint");
    convert(&sharded, &from_checkpoint, &[]);
    let streamed = dir.join("bundle-streamed");
    marengo_export([
        "convert".as_ref(),
        "--merge".as_ref(),
        yaml.as_os_str(),
        "--out".as_ref(),
        streamed.as_os_str(),
    ]);
    assert_eq!(
        sha256_file(&streamed.join("model.weights")),
        sha256_file(&from_checkpoint.join("model.weights"))
    );
    assert_eq!(
        sha256_file(&streamed.join("model.onnx")),
        sha256_file(&from_checkpoint.join("model.onnx"))
    );
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(streamed.join("bundle.json")).expect("bundle.json"),
    )
    .expect("bundle.json is JSON");
    let sources = manifest["provenance"]["sources"].to_string();
    assert!(
        sources.contains("slerp.yml"),
        "provenance names the merge config: {sources}"
    );
    assert!(
        sources.contains("parent-b"),
        "provenance names both parents: {sources}"
    );
}
