//! Every kind of bad input is refused with an error that names the file and the tensor or key,
//! and leaves no bundle behind.

use std::path::{Path, PathBuf};

use marengo_testkit::exporter::{marengo_export_fails, tiny_checkpoint};
use marengo_testkit::files::dir_entries;
use marengo_testkit::scratch_dir;
use safetensors::SafeTensors;

const Q_PROJ: &str = "model.layers.1.self_attn.q_proj.weight";

/// A sharded bf16 tiny Mistral checkpoint in a fresh directory; returns (checkpoint, bundle path).
fn mistral(test: &str) -> (PathBuf, PathBuf) {
    let dir = scratch_dir(test);
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint(
        "mistral-gqa",
        &checkpoint,
        &["--dtype", "bf16", "--shards", "2"],
    );
    (checkpoint, dir.join("bundle"))
}

/// Runs a conversion that must fail; checks no bundle and no temporary directory remain.
#[track_caller]
fn convert_fails(checkpoint: &Path, bundle: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "convert".to_owned(),
        checkpoint.display().to_string(),
        "--out".into(),
        bundle.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let stderr = marengo_export_fails(&args);
    assert!(!bundle.exists(), "{} was created", bundle.display());
    if let Some(parent) = bundle.parent().filter(|p| p.exists()) {
        let leftovers: Vec<_> = dir_entries(parent)
            .into_iter()
            .filter(|n| n.contains(".partial-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
    stderr
}

/// The shard holding `tensor` and the absolute byte range of its data.
fn locate(checkpoint: &Path, tensor: &str) -> (PathBuf, usize, usize) {
    for entry in dir_entries(checkpoint) {
        if !entry.ends_with(".safetensors") {
            continue;
        }
        let path = checkpoint.join(&entry);
        let bytes = std::fs::read(&path).unwrap();
        let (header, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        if let Some(info) = metadata.info(tensor) {
            let base = 8 + header;
            return (path, base + info.data_offsets.0, base + info.data_offsets.1);
        }
    }
    panic!("{tensor} not found in {}", checkpoint.display());
}

fn edit_config(checkpoint: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = checkpoint.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn a_missing_shard_is_named() {
    let (checkpoint, bundle) = mistral("missing_shard");
    std::fs::remove_file(checkpoint.join("model-00002-of-00002.safetensors")).unwrap();
    let err = convert_fails(&checkpoint, &bundle, &[]);
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("shard is missing"),
        "{err}"
    );
}

#[test]
fn a_truncated_shard_is_named() {
    let (checkpoint, bundle) = mistral("truncated_shard");
    let shard = checkpoint.join("model-00001-of-00002.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = convert_fails(&checkpoint, &bundle, &[]);
    assert!(
        err.contains("model-00001-of-00002.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn a_shape_that_disagrees_with_config_is_named() {
    let (checkpoint, bundle) = mistral("shape_mismatch");
    edit_config(&checkpoint, |c| c["intermediate_size"] = 96.into());
    let err = convert_fails(&checkpoint, &bundle, &[]);
    assert!(
        err.contains("model.layers.0.mlp.down_proj.weight") && err.contains("[64, 96]"),
        "{err}"
    );
    assert!(err.contains(".safetensors"), "names the shard: {err}");
}

#[test]
fn a_missing_tensor_is_named() {
    let (checkpoint, bundle) = mistral("missing_tensor");
    edit_config(&checkpoint, |c| c["num_hidden_layers"] = 3.into());
    let err = convert_fails(&checkpoint, &bundle, &[]);
    assert!(
        err.contains("model.layers.2.") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn an_unsupported_architecture_is_named() {
    let (checkpoint, bundle) = mistral("unsupported_architecture");
    edit_config(&checkpoint, |c| {
        c["architectures"] = serde_json::json!(["Phi3ForCausalLM"]);
    });
    let err = convert_fails(&checkpoint, &bundle, &[]);
    assert!(
        err.contains("config.json") && err.contains("Phi3ForCausalLM"),
        "{err}"
    );
}

#[test]
fn an_unsupported_tensor_dtype_is_named() {
    let dir = scratch_dir("unsupported_dtype");
    let checkpoint = dir.join("checkpoint");
    tiny_checkpoint("llama-tied", &checkpoint, &["--dtype", "f32"]);
    // Rewrite the single file with one tensor stored as int8.
    let path = checkpoint.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = file.tensors();
    let norm = "model.norm.weight";
    let int8 = vec![1u8; 64];
    for (name, view) in tensors.iter_mut() {
        if name == norm {
            *view = safetensors::tensor::TensorView::new(safetensors::Dtype::I8, vec![64], &int8)
                .unwrap();
        }
    }
    let rewritten = safetensors::serialize(tensors, None).unwrap();
    std::fs::write(&path, rewritten).unwrap();
    let err = convert_fails(&checkpoint, &dir.join("bundle"), &[]);
    assert!(
        err.contains("model.safetensors") && err.contains(norm) && err.contains("I8"),
        "{err}"
    );
}

#[test]
fn nan_and_inf_weights_are_located() {
    for (test, bits, shown) in [
        ("nan_weight", 0x7FC0u16, "NaN"),
        ("inf_weight", 0xFF80, "-inf"),
    ] {
        let (checkpoint, bundle) = mistral(test);
        let (shard, start, _) = locate(&checkpoint, Q_PROJ);
        let mut bytes = std::fs::read(&shard).unwrap();
        // Row 3, column 5 of a [64, 64] bf16 matrix.
        let at = start + (3 * 64 + 5) * 2;
        bytes[at..at + 2].copy_from_slice(&bits.to_le_bytes());
        std::fs::write(&shard, bytes).unwrap();
        for dtype in ["fp8", "f32"] {
            let err = convert_fails(&checkpoint, &bundle, &["--dtype", dtype]);
            assert!(
                err.contains(Q_PROJ) && err.contains(shown) && err.contains("row 3, column 5"),
                "{err}"
            );
        }
    }
}

#[test]
fn scaled_rope_is_refused_by_key() {
    let (checkpoint, bundle) = mistral("rope_scaling");
    edit_config(&checkpoint, |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    });
    let err = convert_fails(&checkpoint, &bundle, &[]);
    assert!(
        err.contains("rope_scaling") && err.contains("yarn"),
        "{err}"
    );
}

/// Each refusal of what the graph cannot compute names the key, the value found and what is
/// supported, so that the user knows whether another checkpoint or another option would do.
#[test]
fn unsupported_settings_name_the_key_the_value_and_what_is_supported() {
    let (checkpoint, bundle) = mistral("unsupported_settings");
    let original = std::fs::read_to_string(checkpoint.join("config.json")).unwrap();
    let cases: [(&str, serde_json::Value, &[&str]); 5] = [
        (
            "architectures",
            serde_json::json!(["GPT2LMHeadModel"]),
            &[
                "`architectures`",
                "GPT2LMHeadModel",
                "MistralForCausalLM",
                "LlamaForCausalLM",
            ],
        ),
        (
            "hidden_act",
            "gelu".into(),
            &["`hidden_act`", "gelu", "supported: silu"],
        ),
        (
            "attention_bias",
            true.into(),
            &["`attention_bias`", "true", "supported: false"],
        ),
        (
            "mlp_bias",
            true.into(),
            &["`mlp_bias`", "true", "supported: false"],
        ),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            &["`rope_scaling.rope_type`", "yarn", "supported: default"],
        ),
    ];
    for (key, value, wanted) in cases {
        std::fs::write(checkpoint.join("config.json"), &original).unwrap();
        edit_config(&checkpoint, |c| c[key] = value);
        let err = convert_fails(&checkpoint, &bundle, &[]);
        for w in wanted {
            assert!(err.contains(w), "{key}: {w:?} not in {err}");
        }
    }
}

#[test]
fn a_checkpoint_without_tokenizer_is_refused() {
    let (checkpoint, bundle) = mistral("no_tokenizer");
    std::fs::remove_file(checkpoint.join("tokenizer.json")).unwrap();
    let err = convert_fails(&checkpoint, &bundle, &[]);
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn an_unwritable_output_is_named() {
    let (checkpoint, _) = mistral("unwritable_output");
    // A regular file where the output's parent directory should be.
    let blocker = checkpoint.parent().unwrap().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let bundle = blocker.join("bundle");
    let err = marengo_export_fails([
        "convert".as_ref(),
        checkpoint.as_os_str(),
        "--out".as_ref(),
        bundle.as_os_str(),
    ]);
    assert!(err.contains("not-a-dir"), "{err}");
}

#[test]
fn block_size_must_divide_the_input_features() {
    let (checkpoint, bundle) = mistral("bad_block");
    let err = convert_fails(&checkpoint, &bundle, &["--block", "48"]);
    assert!(
        err.contains("--block 48") && err.contains("tensor model."),
        "{err}"
    );
    let err = convert_fails(&checkpoint, &bundle, &["--dtype", "f32", "--block", "32"]);
    assert!(err.contains("--block"), "{err}");
}

/// A GGUF model is one file, so it is easily given where a directory is expected: the error
/// says how to give it instead of only that it is not a directory.
#[test]
fn a_gguf_file_given_as_the_checkpoint_points_to_gguf() {
    let dir = scratch_dir("gguf_as_checkpoint");
    let gguf = dir.join("model.gguf");
    // The magic and a version are enough: the exporter must not parse further to tell.
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    let err = convert_fails(&gguf, &dir.join("bundle"), &[]);
    assert!(
        err.contains("model.gguf") && err.contains("--gguf"),
        "{err}"
    );

    let other = dir.join("weights.bin");
    std::fs::write(&other, b"not a model").unwrap();
    let err = convert_fails(&other, &dir.join("bundle"), &[]);
    assert!(
        err.contains("weights.bin") && err.contains("a file, not a checkpoint directory"),
        "{err}"
    );
}
