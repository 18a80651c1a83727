//! The exported graph, run by an independent engine (onnxruntime, from the CI venv), reproduces
//! HuggingFace transformers: the f32 bundle's logits and greedy tokens match the committed
//! goldens (tests/fixtures/golden/, made by make_golden.py), and the FP8 bundles stay within
//! measured bounds of the f32 bundle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use marengo_testkit::exporter::{convert, marengo_export, synth, tokenizer_fixture};
use marengo_testkit::files::sha256_file;
use marengo_testkit::onnxruntime::{python_script, read_f32_le};
use marengo_testkit::repo_root;

/// The f32 export path's quality bar: logits within 1e-4 of transformers float32 (issue 18;
/// DESIGN.md asks 1e-3). Measured at most 5.7e-6 on every golden, from HF and from GGUF.
const MAX_ABS_LOGIT_DIFF: f32 = 1e-4;

/// `tests/fixtures/golden/<name>.json`, written by make_golden.py.
#[derive(Deserialize)]
struct Golden {
    config: PathBuf,
    synth_args: Vec<String>,
    safetensors_sha256: BTreeMap<String, String>,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    logits_file: String,
    logits_shape: [usize; 2],
    greedy_logits_shape: [usize; 2],
}

impl Golden {
    fn load(name: &str) -> Golden {
        let path = golden_dir().join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn prompt_arg(&self) -> String {
        let ids: Vec<String> = self.prompt_ids.iter().map(u32::to_string).collect();
        ids.join(",")
    }

    /// A float32 tensor of the golden safetensors file (`logits` or `greedy_logits`).
    fn tensor(&self, name: &str, shape: [usize; 2]) -> Vec<f32> {
        let path = golden_dir().join(&self.logits_file);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let tensors =
            SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tensor = tensors
            .tensor(name)
            .unwrap_or_else(|e| panic!("{}: tensor {name}: {e}", path.display()));
        assert_eq!(
            tensor.dtype(),
            Dtype::F32,
            "{}: {name} dtype",
            path.display()
        );
        assert_eq!(tensor.shape(), shape, "{}: {name} shape", path.display());
        tensor
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// Synthesizes the golden's checkpoint into `dir` and checks it is byte for byte the one the
    /// goldens were made from, so that a changed synthesizer is reported as such and not as an
    /// exporter bug.
    fn synthesize(&self, dir: &Path) {
        // convert needs a tokenizer.json; it does not enter the weights the goldens hash.
        let tokenizer = tokenizer_fixture();
        let mut args = vec!["--tokenizer".to_owned(), tokenizer.display().to_string()];
        args.extend(self.synth_args.iter().cloned());
        synth(&repo_root().join(&self.config), dir, &args);
        let mut made = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("readable directory entry").path();
            if path.extension().is_some_and(|ext| ext == "safetensors") {
                let name = path
                    .file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned();
                made.insert(name, sha256_file(&path));
            }
        }
        assert_eq!(
            made, self.safetensors_sha256,
            "marengo-export synth no longer makes the checkpoint the goldens were made from: \
             rerun tests/fixtures/golden/make_golden.py and commit its outputs"
        );
    }
}

/// A private directory for one test run, removed when dropped: unique, so that runs sharing a
/// target directory (two checkouts, or a rerun while one is going) cannot clobber each other.
fn work_dir(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{test}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap_or_else(|e| panic!("creating a {test} directory: {e}"))
}

fn golden_dir() -> PathBuf {
    repo_root().join("tests/fixtures/golden")
}

/// What ort_generate.py prints.
#[derive(Deserialize)]
struct OrtGeneration {
    greedy: Vec<u32>,
    logits_shape: [usize; 2],
    greedy_logits_shape: [usize; 2],
}

/// Largest absolute difference between two equally long arrays; NaN anywhere gives NaN, which
/// fails every `<=` bound.
fn max_abs_diff(expected: &[f32], actual: &[f32]) -> f32 {
    assert_eq!(
        expected.len(),
        actual.len(),
        "compared arrays differ in length"
    );
    expected
        .iter()
        .zip(actual)
        .map(|(e, a)| (e - a).abs())
        .fold(0.0f32, |m, d| {
            if m.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

/// What compare_bundles.py prints.
#[derive(Deserialize)]
struct Comparison {
    positions: usize,
    kl_mean: f64,
    kl_max: f64,
    top1_agreement: f64,
    reference_greedy: Vec<u32>,
    candidate_greedy: Vec<u32>,
    greedy_common_prefix: usize,
}

/// Where a test's bundle is exported from.
#[derive(Clone, Copy)]
enum Source {
    /// The golden's synthesized HF checkpoint.
    HfDirectory,
    /// The committed GGUF `tests/fixtures/gguf/<name>.gguf`, written from that checkpoint by
    /// gguf-py the way llama.cpp's converter writes it (make_tiny_ggufs.py).
    Gguf,
}

fn f32_bundle_matches_transformers(name: &str) {
    f32_bundle_from_matches_transformers(name, Source::HfDirectory);
}

fn f32_bundle_from_matches_transformers(name: &str, source: Source) {
    let golden = Golden::load(name);
    let dir = work_dir(&format!("ort-f32-{name}"));
    let work = dir.path();
    let bundle = work.join("bundle-f32");
    match source {
        Source::HfDirectory => {
            let checkpoint = work.join("checkpoint");
            golden.synthesize(&checkpoint);
            convert(&checkpoint, &bundle, &["--dtype", "f32"]);
        }
        Source::Gguf => {
            let gguf = repo_root().join(format!("tests/fixtures/gguf/{name}.gguf"));
            marengo_export([
                "convert".as_ref(),
                "--gguf".as_ref(),
                gguf.as_os_str(),
                "--out".as_ref(),
                bundle.as_os_str(),
                "--dtype".as_ref(),
                "f32".as_ref(),
            ]);
        }
    }

    let logits_file = work.join("prompt-logits.f32");
    let greedy_logits_file = work.join("greedy-logits.f32");
    let stdout = python_script(
        "ort_generate.py",
        [
            "--bundle".as_ref(),
            bundle.as_os_str(),
            "--prompt-ids".as_ref(),
            golden.prompt_arg().as_ref(),
            "--max-new-tokens".as_ref(),
            golden.greedy_ids.len().to_string().as_ref(),
            "--logits-out".as_ref(),
            logits_file.as_os_str(),
            "--greedy-logits-out".as_ref(),
            greedy_logits_file.as_os_str(),
            "--threads".as_ref(),
            "1".as_ref(),
        ],
    );
    let generated: OrtGeneration = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("ort_generate.py output {stdout:?}: {e}"));
    assert_eq!(
        generated.logits_shape, golden.logits_shape,
        "{name}: logits shape"
    );
    assert_eq!(
        generated.greedy_logits_shape, golden.greedy_logits_shape,
        "{name}: greedy logits shape"
    );

    let prompt_diff = max_abs_diff(
        &golden.tensor("logits", golden.logits_shape),
        &read_f32_le(&logits_file),
    );
    let decode_diff = max_abs_diff(
        &golden.tensor("greedy_logits", golden.greedy_logits_shape),
        &read_f32_le(&greedy_logits_file),
    );
    println!(
        "{name}: f32 bundle (onnxruntime) vs transformers: max |Δlogit| prompt {prompt_diff:.3e}, \
         decode steps {decode_diff:.3e}"
    );
    assert!(
        prompt_diff <= MAX_ABS_LOGIT_DIFF,
        "{name}: prompt logits differ from transformers by {prompt_diff:e} > {MAX_ABS_LOGIT_DIFF:e}"
    );
    assert!(
        decode_diff <= MAX_ABS_LOGIT_DIFF,
        "{name}: decode-step logits (over the KV cache) differ from transformers by \
         {decode_diff:e} > {MAX_ABS_LOGIT_DIFF:e}"
    );
    assert_eq!(generated.greedy, golden.greedy_ids, "{name}: greedy tokens");
}

/// Bounds on the FP8 bundle against the f32 bundle, both run by onnxruntime.
struct Fp8Bounds {
    kl_mean: f64,
    kl_max: f64,
    top1_min: f64,
}

fn fp8_bundle_stays_close(name: &str, block: Option<usize>, bounds: Fp8Bounds) {
    let golden = Golden::load(name);
    let label = block.map_or("per-channel".to_owned(), |b| format!("block {b}"));
    let dir = work_dir(&format!("ort-fp8-{name}-{}", label.replace(' ', "")));
    let work = dir.path();
    let checkpoint = work.join("checkpoint");
    golden.synthesize(&checkpoint);
    let reference = work.join("bundle-f32");
    convert(&checkpoint, &reference, &["--dtype", "f32"]);
    let candidate = work.join("bundle-fp8");
    let block_arg = block.map(|b| b.to_string());
    let fp8_args: Vec<&str> = block_arg
        .iter()
        .flat_map(|b| ["--block", b.as_str()])
        .collect();
    convert(&checkpoint, &candidate, &fp8_args);

    let stdout = python_script(
        "compare_bundles.py",
        [
            "--reference".as_ref(),
            reference.as_os_str(),
            "--candidate".as_ref(),
            candidate.as_os_str(),
            "--prompt-ids".as_ref(),
            golden.prompt_arg().as_ref(),
            "--max-new-tokens".as_ref(),
            golden.greedy_ids.len().to_string().as_ref(),
            "--threads".as_ref(),
            "1".as_ref(),
        ],
    );
    let report: Comparison = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("compare_bundles.py output {stdout:?}: {e}"));
    println!(
        "{name} FP8 {label} vs f32 over {} positions: KL mean {:.3e}, max {:.3e}, top-1 {:.3}; \
         greedy agree on {} of {}\n  f32 greedy {:?}\n  FP8 greedy {:?}",
        report.positions,
        report.kl_mean,
        report.kl_max,
        report.top1_agreement,
        report.greedy_common_prefix,
        report.reference_greedy.len(),
        report.reference_greedy,
        report.candidate_greedy
    );
    assert!(
        report.kl_mean <= bounds.kl_mean && report.kl_max <= bounds.kl_max,
        "{name} FP8 {label}: KL mean {:.3e} / max {:.3e} over bounds {:.1e} / {:.1e}",
        report.kl_mean,
        report.kl_max,
        bounds.kl_mean,
        bounds.kl_max
    );
    assert!(
        report.top1_agreement >= bounds.top1_min,
        "{name} FP8 {label}: top-1 agreement {} < {}",
        report.top1_agreement,
        bounds.top1_min
    );
}

#[test]
fn mistral_gqa_f32_bundle_matches_transformers() {
    f32_bundle_matches_transformers("mistral-gqa");
}

#[test]
fn llama_tied_f32_bundle_matches_transformers() {
    f32_bundle_matches_transformers("llama-tied");
}

/// Llama 3.1's rope scaling, folded into the rotary caches, computes what transformers does.
#[test]
fn llama3_scaled_f32_bundle_matches_transformers() {
    f32_bundle_matches_transformers("llama3-scaled");
}

/// Qwen2's q/k/v biases, added after the products, compute what transformers does.
#[test]
fn qwen2_bias_f32_bundle_matches_transformers() {
    f32_bundle_matches_transformers("qwen2-bias");
}

/// The same model from a GGUF: q/k rows unpermuted, the scaling read from `rope_freqs.weight`,
/// the head tied to the embedding.
/// A 5-position sliding window, shorter than the prompt: the graph's window mask.
#[test]
fn mistral_window_f32_bundle_matches_transformers() {
    f32_bundle_matches_transformers("mistral-window");
}

#[test]
fn llama3_scaled_gguf_f32_bundle_matches_transformers() {
    f32_bundle_from_matches_transformers("llama3-scaled", Source::Gguf);
}

/// Qwen2 from a GGUF: biases mapped, q/k rows as HF has them (no llama.cpp permutation).
#[test]
fn qwen2_bias_gguf_f32_bundle_matches_transformers() {
    f32_bundle_from_matches_transformers("qwen2-bias", Source::Gguf);
}

// FP8 bounds. KL is KL(f32 ‖ FP8) in nats over 31 teacher-forced positions (the prompt and the
// f32 bundle's greedy tokens); onnxruntime 1.32, one thread, so the figures are deterministic.
// Measured with the exporter's quantizer (row or block absmax → 448, round to nearest even):
//
//                          KL mean   KL max    top-1
//   mistral-gqa per-channel 3.46e-4   5.64e-4   0.871
//   mistral-gqa block 32    3.59e-4   5.46e-4   0.903
//   llama-tied  per-channel 4.04e-3   1.21e-2   1.000
//   llama-tied  block 32    5.18e-3   1.16e-2   1.000
//
// The same figures came out of an independently written FP8 graph (torch's float8_e4m3fn), so
// they are the cost of E4M3 itself. The bounds are about twice the measured values: room for a
// legitimate quantizer change, yet a quantizer that loses one bit of precision fails them —
// the same graphs with E5M2 rounding (2 mantissa bits) gave mistral-gqa KL 1.44e-3 / 2.51e-3,
// top-1 0.742 and llama-tied 1.35e-2 / 3.61e-2, and zeroing one input column of every weight
// gave 5.0e-3 / 1.5e-2 and 6.7e-2 / 0.20. The configs differ by an order of magnitude because
// llama-tied's logits spread 4× wider (std 2.3 against 0.58), and KL grows with the square of
// the logit error. Top-1 is low on mistral-gqa because random weights give flat distributions
// with near-ties (smallest greedy top-2 margin 0.007); its bound allows 6 of 31 flips, E5M2 had 8.
const MISTRAL_FP8: Fp8Bounds = Fp8Bounds {
    kl_mean: 7e-4,
    kl_max: 1.2e-3,
    top1_min: 0.8,
};
const LLAMA_FP8: Fp8Bounds = Fp8Bounds {
    kl_mean: 1e-2,
    kl_max: 2.5e-2,
    top1_min: 0.95,
};

#[test]
fn mistral_gqa_fp8_per_channel_stays_close_to_f32() {
    fp8_bundle_stays_close("mistral-gqa", None, MISTRAL_FP8);
}

#[test]
fn mistral_gqa_fp8_block_32_stays_close_to_f32() {
    fp8_bundle_stays_close("mistral-gqa", Some(32), MISTRAL_FP8);
}

#[test]
fn llama_tied_fp8_per_channel_stays_close_to_f32() {
    fp8_bundle_stays_close("llama-tied", None, LLAMA_FP8);
}

#[test]
fn llama_tied_fp8_block_32_stays_close_to_f32() {
    fp8_bundle_stays_close("llama-tied", Some(32), LLAMA_FP8);
}
