//! The engine against its two references, on the tiny golden checkpoints:
//!
//! - an f32 bundle gives HuggingFace transformers' float32 logits (within 1e-3, at every
//!   prompt position and every greedy step) and the same 20 greedy tokens, whether the
//!   prompt is fed at once or one token at a time through the KV cache;
//! - an FP8 bundle (per-channel and blocked scales) gives onnxruntime's greedy tokens on the
//!   same bundle, and its logits stay close to onnxruntime's.

use std::path::{Path, PathBuf};
use std::process::Command;

use marengo::engine::{Engine, EngineOptions};
use marengo::sequence::Sequence;
use safetensors::SafeTensors;

#[path = "support/binaries.rs"]
mod binaries;
#[path = "support/command.rs"]
mod command;
#[path = "support/onnxruntime.rs"]
mod onnxruntime;
use binaries::marengo_export;
use command::run;
use onnxruntime::{OrtGreedy, ort_greedy};

const TOLERANCE: f32 = 1e-3;

struct Golden {
    config: PathBuf,
    synth_args: Vec<String>,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    /// `[prompt positions, vocab]` then `[greedy steps, vocab]`.
    logits: Vec<f32>,
    greedy_logits: Vec<f32>,
    vocab: usize,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden(name: &'static str) -> Golden {
    let dir = repo().join("tests/fixtures/golden");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("{name}.json"))).expect("golden json"),
    )
    .expect("golden json parses");
    let ids = |key: &str| -> Vec<u32> {
        meta[key]
            .as_array()
            .expect(key)
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    };
    let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).expect("golden logits");
    let tensors = SafeTensors::deserialize(&bytes).expect("golden safetensors");
    let floats = |key: &str| -> Vec<f32> {
        let t = tensors.tensor(key).expect(key);
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    Golden {
        config: repo().join(meta["config"].as_str().expect("config")),
        synth_args: meta["synth_args"]
            .as_array()
            .expect("synth_args")
            .iter()
            .map(|v| v.as_str().expect("arg").to_string())
            .collect(),
        prompt: ids("prompt_ids"),
        greedy: ids("greedy_ids"),
        logits: floats("logits"),
        greedy_logits: floats("greedy_logits"),
        vocab: meta["logits_shape"][1].as_u64().expect("vocab") as usize,
    }
}

/// Synthesizes the golden checkpoint and converts it with `convert_args`.
fn bundle(golden: &Golden, scratch: &Path, label: &str, convert_args: &[&str]) -> PathBuf {
    let checkpoint = scratch.join("checkpoint");
    if !checkpoint.exists() {
        run(Command::new(marengo_export())
            .arg("synth")
            .arg("--config")
            .arg(&golden.config)
            .args(&golden.synth_args)
            .arg("--tokenizer")
            .arg(repo().join("tests/fixtures/mistral-7b-v0.1/tokenizer.json"))
            .arg("--out")
            .arg(&checkpoint));
    }
    let out = scratch.join(label);
    run(Command::new(marengo_export())
        .arg("convert")
        .arg(&checkpoint)
        .arg("--out")
        .arg(&out)
        .args(convert_args));
    out
}

fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .expect("non-empty logits")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn greedy(session: &mut Sequence, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut logits = session.feed(prompt).expect("prefill");
    let mut tokens = Vec::new();
    let mut all = Vec::new();
    for _ in 0..steps {
        let next = argmax(&logits);
        all.push(logits);
        tokens.push(next);
        logits = session.feed(&[next]).expect("decode step");
    }
    (tokens, all)
}

fn load(bundle: &Path) -> std::sync::Arc<Engine> {
    Engine::load(bundle, &EngineOptions::default()).expect("bundle loads")
}

fn f32_bundle_matches_transformers(name: &'static str) {
    let golden = golden(name);
    let scratch = tempfile::tempdir().expect("scratch dir");
    let bundle = bundle(&golden, scratch.path(), "f32", &["--dtype", "f32"]);
    let engine = load(&bundle);
    let mut session = engine.new_model_session().expect("session");
    let vocab = golden.vocab;

    // One token at a time: every prompt position's logits, through the KV cache.
    let mut worst = 0.0f32;
    for (position, &token) in golden.prompt.iter().enumerate() {
        let logits = session.feed(&[token]).expect("feed one token");
        let expected = &golden.logits[position * vocab..(position + 1) * vocab];
        worst = worst.max(max_abs_diff(&logits, expected));
    }
    println!("{name}: f32 prompt logits, token by token: max |diff| {worst:.3e}");
    assert!(
        worst <= TOLERANCE,
        "{name}: prompt logits differ by {worst}"
    );

    // The whole prompt at once, then greedy decoding.
    session.reset().expect("reset");
    let (tokens, step_logits) = greedy(&mut session, &golden.prompt, golden.greedy.len());
    let worst = step_logits
        .iter()
        .enumerate()
        .map(|(i, l)| max_abs_diff(l, &golden.greedy_logits[i * vocab..(i + 1) * vocab]))
        .fold(0.0, f32::max);
    println!("{name}: f32 greedy-step logits: max |diff| {worst:.3e}");
    assert!(
        worst <= TOLERANCE,
        "{name}: greedy-step logits differ by {worst}"
    );
    assert_eq!(
        tokens, golden.greedy,
        "{name}: greedy tokens differ from transformers"
    );
}

#[test]
fn f32_mistral_gqa_matches_transformers() {
    f32_bundle_matches_transformers("mistral-gqa");
}

#[test]
fn f32_llama_tied_matches_transformers() {
    f32_bundle_matches_transformers("llama-tied");
}

fn fp8_bundle_matches_onnxruntime(name: &'static str, label: &str, convert_args: &[&str]) {
    let golden = golden(name);
    let scratch = tempfile::tempdir().expect("scratch dir");
    let bundle = bundle(&golden, scratch.path(), label, convert_args);
    let steps = golden.greedy.len();
    let OrtGreedy {
        tokens: ort_greedy,
        logits: ort_logits,
    } = ort_greedy(&bundle, &golden.prompt, steps, 1);

    let engine = load(&bundle);
    let mut session = engine.new_model_session().expect("session");
    let (tokens, step_logits) = greedy(&mut session, &golden.prompt, steps);
    let vocab = golden.vocab;
    let worst = step_logits
        .iter()
        .enumerate()
        .map(|(i, l)| max_abs_diff(l, &ort_logits[i * vocab..(i + 1) * vocab]))
        .fold(0.0, f32::max);
    println!("{name} {label}: FP8 greedy-step logits vs onnxruntime: max |diff| {worst:.3e}");
    assert_eq!(
        tokens, ort_greedy,
        "{name} {label}: greedy tokens differ from onnxruntime"
    );
    assert!(
        worst <= TOLERANCE,
        "{name} {label}: logits differ from onnxruntime by {worst}"
    );
}

#[test]
fn fp8_mistral_gqa_matches_onnxruntime() {
    fp8_bundle_matches_onnxruntime("mistral-gqa", "fp8", &[]);
}

#[test]
fn fp8_blocked_mistral_gqa_matches_onnxruntime() {
    fp8_bundle_matches_onnxruntime("mistral-gqa", "fp8-block32", &["--block", "32"]);
}

#[test]
fn fp8_llama_tied_matches_onnxruntime() {
    fp8_bundle_matches_onnxruntime("llama-tied", "fp8", &[]);
}
