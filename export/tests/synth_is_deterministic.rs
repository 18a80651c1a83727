//! Synthesized checkpoints depend only on config, seed and dtype: the golden logits committed
//! by the fixtures script stay valid on any machine and for any shard count.

use marengo_bundle::Bundle;
use marengo_testkit::exporter::{convert, synth, tiny_config, tokenizer_fixture};
use marengo_testkit::files::{dir_entries, sha256_file};
use marengo_testkit::scratch_dir;

#[test]
fn same_seed_same_bytes_and_sharding_changes_no_value() {
    let dir = scratch_dir("synth_deterministic");
    let config = tiny_config("mistral-gqa");
    let args = |shards: &str, seed: &str| {
        ["--dtype", "f32", "--shards", shards, "--seed", seed]
            .map(String::from)
            .to_vec()
    };
    synth(&config, &dir.join("a"), &args("1", "5"));
    synth(&config, &dir.join("b"), &args("1", "5"));
    synth(&config, &dir.join("c"), &args("3", "5"));
    synth(&config, &dir.join("d"), &args("1", "6"));
    let weights = |name: &str| sha256_file(&dir.join(name).join("model.safetensors"));
    assert_eq!(weights("a"), weights("b"));
    assert_ne!(weights("a"), weights("d"));
    assert_eq!(
        dir_entries(&dir.join("c"))
            .iter()
            .filter(|n| n.ends_with(".safetensors"))
            .count(),
        3
    );

    // Same values whatever the sharding: every tensor of the f32 bundles is byte-identical.
    std::fs::copy(tokenizer_fixture(), dir.join("a/tokenizer.json")).unwrap();
    std::fs::copy(tokenizer_fixture(), dir.join("c/tokenizer.json")).unwrap();
    convert(&dir.join("a"), &dir.join("bundle-a"), &["--dtype", "f32"]);
    convert(&dir.join("c"), &dir.join("bundle-c"), &["--dtype", "f32"]);
    let a = Bundle::open(dir.join("bundle-a")).unwrap();
    let c = Bundle::open(dir.join("bundle-c")).unwrap();
    assert_eq!(a.manifest().tensors.len(), c.manifest().tensors.len());
    for tensor in &a.manifest().tensors {
        assert_eq!(
            a.tensor_bytes(&tensor.name),
            c.tensor_bytes(&tensor.name),
            "{}",
            tensor.name
        );
    }
}
