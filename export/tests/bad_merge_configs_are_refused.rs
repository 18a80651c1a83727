//! Every merge config outside the supported SLERP subset, and every pair of parents that cannot
//! be merged, is refused before any tensor is written, with an error that names the key or the
//! tensor and says what is supported.

use std::path::{Path, PathBuf};

use marengo_testkit::exporter::{marengo_export_fails, synth, tiny_config};
use marengo_testkit::files::dir_entries;
use marengo_testkit::{repo_root, scratch_dir};

fn parent(name: &str) -> String {
    repo_root()
        .join("tests/fixtures/merge")
        .join(name)
        .display()
        .to_string()
}

/// A valid config's models section between two parents.
fn models(a: &str, b: &str) -> String {
    format!("base_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n")
}

fn good_models() -> String {
    models(&parent("parent-a"), &parent("parent-b"))
}

/// Writes `yaml` into a fresh directory, runs `merge` (and `convert --merge`) on it, checks
/// both fail without leaving output behind, and returns merge's stderr.
#[track_caller]
fn refused(test: &str, yaml: &str) -> String {
    let dir = scratch_dir(test);
    let config = dir.join("slerp.yml");
    std::fs::write(&config, yaml).expect("writing the config");
    let out = dir.join("merged");
    let stderr = marengo_export_fails([
        "merge".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let bundle = dir.join("bundle");
    let convert_stderr = marengo_export_fails([
        "convert".as_ref(),
        "--merge".as_ref(),
        config.as_os_str(),
        "--out".as_ref(),
        bundle.as_os_str(),
    ]);
    assert_eq!(
        dir_entries(&dir),
        vec!["slerp.yml".to_owned()],
        "only the config is left in {}",
        dir.display()
    );
    // The innermost cause: the line after anyhow's "Caused by:".
    let reason = |s: &str| {
        s.lines()
            .skip_while(|l| !l.starts_with("Caused by:"))
            .nth(1)
            .unwrap_or_else(|| panic!("no cause in:\n{s}"))
            .trim()
            .to_owned()
    };
    assert_eq!(
        reason(&stderr),
        reason(&convert_stderr),
        "merge and convert --merge give the same reason"
    );
    stderr
}

#[track_caller]
fn assert_mentions(stderr: &str, needles: &[&str]) {
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
}

#[test]
fn unknown_merge_method() {
    let stderr = refused(
        "merge_bad_method",
        &format!(
            "merge_method: ties\n{}parameters: {{t: 0.5}}\n",
            good_models()
        ),
    );
    assert_mentions(
        &stderr,
        &["merge_method \"ties\" is not supported", "slerp"],
    );
}

#[test]
fn three_models() {
    let yaml = format!(
        "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\nparameters: {{t: 0.5}}\n",
        a = parent("parent-a"),
        b = parent("parent-b"),
        c = parent("constant-t"),
    );
    let stderr = refused("merge_three_models", &yaml);
    assert_mentions(&stderr, &["exactly two models", "this config has 3"]);
}

#[test]
fn three_sources_in_a_slice() {
    let (a, b) = (parent("parent-a"), parent("parent-b"));
    let yaml = format!(
        "merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 5]}}\n      - {{model: {b}, layer_range: [0, 5]}}\n      - {{model: {b}, layer_range: [0, 5]}}\nparameters: {{t: 0.5}}\n"
    );
    let stderr = refused("merge_three_sources", &yaml);
    assert_mentions(&stderr, &["slices[0] has 3 sources", "exactly two models"]);
}

#[test]
fn missing_base_model() {
    let yaml = format!(
        "merge_method: slerp\nmodels:\n  - model: {}\n  - model: {}\nparameters: {{t: 0.5}}\n",
        parent("parent-a"),
        parent("parent-b")
    );
    let stderr = refused("merge_missing_base", &yaml);
    assert_mentions(&stderr, &["base_model is missing"]);
}

#[test]
fn unknown_parameter() {
    let stderr = refused(
        "merge_unknown_parameter",
        &format!(
            "merge_method: slerp\n{}parameters:\n  t: 0.5\n  density: 0.3\n",
            good_models()
        ),
    );
    assert_mentions(
        &stderr,
        &["unknown parameter `density`", "SLERP takes only t"],
    );
}

#[test]
fn unknown_top_level_key() {
    let stderr = refused(
        "merge_unknown_key",
        &format!(
            "merge_method: slerp\n{}parameters: {{t: 0.5}}\ntokenizer_source: union\n",
            good_models()
        ),
    );
    assert_mentions(
        &stderr,
        &[
            "`tokenizer_source` is not supported",
            "merge_method, base_model",
        ],
    );
}

#[test]
fn bad_t_values() {
    let cases = [
        ("1.5", "1.5 is outside [0, 1]"),
        ("-0.1", "outside [0, 1]"),
        ("fast", "is not a number"),
        ("[]", "an empty list"),
        ("[0.1, half, 0.9]", "parameters.t[1]"),
        (".nan", "outside [0, 1]"),
        ("[{filter: mlp, value: 2}]", "parameters.t[0].value"),
        ("[{filter: mlp}]", "has no value"),
        ("[{filter: mlp, value: 0.5}, 0.3]", "mixes numbers"),
        (
            "[{filter: mlp, value: 0.5, weight: 1}]",
            "`weight` is not supported",
        ),
    ];
    for (i, (t, needle)) in cases.into_iter().enumerate() {
        let stderr = refused(
            &format!("merge_bad_t_{i}"),
            &format!(
                "merge_method: slerp\n{}parameters:\n  t: {t}\n",
                good_models()
            ),
        );
        assert_mentions(&stderr, &[needle]);
    }
}

#[test]
fn no_t_for_some_tensors() {
    let stderr = refused(
        "merge_missing_t",
        &format!(
            "merge_method: slerp\n{}parameters:\n  t:\n    - {{filter: self_attn, value: 0.3}}\n    - {{filter: mlp, value: 0.7}}\n",
            good_models()
        ),
    );
    assert_mentions(
        &stderr,
        &["no t for tensor model.embed_tokens.weight", "no default"],
    );
    let stderr = refused(
        "merge_no_t",
        &format!("merge_method: slerp\n{}", good_models()),
    );
    assert_mentions(&stderr, &["no t for tensor"]);
}

#[test]
fn per_model_parameters() {
    let yaml = format!(
        "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n    parameters: {{t: 0.5}}\n",
        a = parent("parent-a"),
        b = parent("parent-b"),
    );
    let stderr = refused("merge_per_model_t", &yaml);
    assert_mentions(&stderr, &["models[1].parameters", "top-level parameters"]);
}

#[test]
fn bad_layer_ranges() {
    let (a, b) = (parent("parent-a"), parent("parent-b"));
    let slice = |ra: &str, rb: &str| {
        format!(
            "merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n      - {{model: {a}, layer_range: {ra}}}\n      - {{model: {b}, layer_range: {rb}}}\nparameters: {{t: 0.5}}\n"
        )
    };
    let stderr = refused("merge_range_too_long", &slice("[0, 6]", "[0, 6]"));
    assert_mentions(&stderr, &["layers 0..6", "it has 5"]);
    let stderr = refused("merge_range_lengths", &slice("[0, 5]", "[1, 5]"));
    assert_mentions(&stderr, &["different lengths"]);
    let stderr = refused("merge_range_backwards", &slice("[3, 1]", "[3, 1]"));
    assert_mentions(
        &stderr,
        &["slices[0].sources[0].layer_range", "start < end"],
    );
}

#[test]
fn unsupported_dtype() {
    let stderr = refused(
        "merge_float64",
        &format!(
            "merge_method: slerp\n{}parameters: {{t: 0.5}}\ndtype: float64\n",
            good_models()
        ),
    );
    assert_mentions(&stderr, &["dtype", "bfloat16, float16, float32"]);
}

#[test]
fn missing_parent() {
    let stderr = refused(
        "merge_missing_parent",
        &format!(
            "merge_method: slerp\n{}parameters: {{t: 0.5}}\n",
            models(&parent("parent-a"), "/nonexistent/parent")
        ),
    );
    assert_mentions(
        &stderr,
        &["/nonexistent/parent", "no such checkpoint directory"],
    );
}

#[test]
fn not_yaml() {
    let stderr = refused("merge_not_yaml", "merge_method: [slerp\n");
    assert_mentions(&stderr, &["is not valid YAML"]);
}

/// A parent of another architecture (here a wider model) is refused by config.json, before
/// any header is compared.
#[test]
fn parents_of_different_architectures() {
    let dir = scratch_dir("merge_other_architecture_parent");
    let other = dir.join("wide");
    synth(
        &tiny_config("mistral-gqa"),
        &other,
        &["--dtype".into(), "bf16".into()],
    );
    let stderr = refused(
        "merge_other_architecture",
        &format!(
            "merge_method: slerp\n{}parameters: {{t: 0.5}}\n",
            models(&parent("parent-a"), &other.display().to_string())
        ),
    );
    assert_mentions(&stderr, &["differ in hidden_size", "32", "64"]);
}

/// Same config.json, but one tensor of the other parent has another shape: refused from the
/// safetensors headers, naming the tensor, before the first tensor is merged.
#[test]
fn parents_with_mismatched_shapes() {
    let dir = scratch_dir("merge_mismatched_shape_parent");
    let other = dir.join("reshaped");
    copy_checkpoint(&PathBuf::from(parent("parent-b")), &other);
    let file = other.join("model.safetensors");
    let bytes = std::fs::read(&file).expect("reading the copy");
    let loaded = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let last = "model.layers.4.mlp.down_proj.weight";
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = loaded
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            if name == last {
                let shape = vec![view.shape()[1], view.shape()[0]];
                let reshaped =
                    safetensors::tensor::TensorView::new(view.dtype(), shape, view.data())
                        .expect("same size");
                (name, reshaped)
            } else {
                (name, view)
            }
        })
        .collect();
    let rewritten = safetensors::serialize(tensors, None).expect("serialize");
    std::fs::write(&file, rewritten).expect("writing the reshaped parent");
    let stderr = refused(
        "merge_mismatched_shapes",
        &format!(
            "merge_method: slerp\n{}parameters: {{t: 0.5}}\n",
            models(&parent("parent-a"), &other.display().to_string())
        ),
    );
    assert_mentions(&stderr, &[last, "[32, 64]", "[64, 32]"]);
}

fn copy_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating the copy");
    for name in dir_entries(from) {
        std::fs::copy(from.join(&name), to.join(&name)).expect("copying a checkpoint file");
    }
}
