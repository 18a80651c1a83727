//! `marengod perplexity` on real weights: SmolLM2-135M-Instruct's GGUF (`.ci/smollm2.sh`)
//! exported to FP8 and to f32, scored over a fixed text against each other, as a faster kernel
//! that changes the arithmetic will be judged; and its refusals, with a clear message and a
//! nonzero exit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use marengo_testkit::binaries::{marengo_export, marengod};
use marengo_testkit::{Kind, fixtures, repo_root, run, run_fails, scratch_dir, tiny_bundle};

/// A public text of ours (ARCHITECTURE.md from "The daemon" on, as of this test's writing):
/// 3111 tokens, 6 windows of 512, 1530 scored positions.
fn text() -> PathBuf {
    fixtures().join("perplexity/architecture.md")
}
const WINDOW: &str = "512";

/// Measured on this text with windows of 512 (FP8 vs f32, the f32 bundle as reference), with the
/// exact kernels: perplexity 76.07 vs 74.06, KL mean 1.753e-2 nats, max 0.204, top-1 agreement
/// 91.31 %; with the prompt's bf16-pair panels (AVX-512 BF16): 76.05, KL mean 1.811e-2, max
/// 0.200, top-1 91.50 %.
/// llama.cpp's llama-perplexity on the same text and windows gives 74.0606 for the GGUF's
/// weights in f32, and for Q8_0 made from them: perplexity 74.12, KL mean 4.8e-3, max 4.2e-2,
/// top-1 94.97 %.
///
/// The KL bound is the exact path's mean plus 10 %, the most issue #13 allows a faster path to
/// add over the exact one; the others leave room for summation order only.
const MAX_KL_MEAN: f64 = 0.0193;
const MAX_KL_MAX: f64 = 0.3;
const MIN_TOP1_AGREEMENT_PERCENT: f64 = 89.0;
/// The f32 bundle's perplexity is llama.cpp's on the same weights (74.0606), to 0.5 %.
const LLAMA_CPP_F32_PERPLEXITY: f64 = 74.0606;
const F32_PERPLEXITY_TOLERANCE: f64 = 0.005;
/// FP8's perplexity over f32's: measured 1.027.
const MAX_PERPLEXITY_RATIO: f64 = 1.04;

fn smollm2_gguf() -> PathBuf {
    let path = PathBuf::from(run(&mut Command::new(repo_root().join(".ci/smollm2.sh"))).trim());
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// The GGUF exported to FP8 and to f32, once for the tests of this binary.
fn bundles() -> (&'static Path, &'static Path) {
    static BUNDLES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    let (fp8, f32) = BUNDLES.get_or_init(|| {
        let gguf = smollm2_gguf();
        let dir = scratch_dir("smollm2-perplexity");
        let (fp8, f32) = (dir.join("fp8"), dir.join("f32"));
        for (out, extra) in [(&fp8, &[][..]), (&f32, &["--dtype", "f32"][..])] {
            run(Command::new(marengo_export())
                .arg("convert")
                .arg("--gguf")
                .arg(&gguf)
                .arg("--out")
                .arg(out)
                .args(extra));
        }
        (fp8, f32)
    });
    (fp8, f32)
}

fn perplexity(bundle: &Path, file: &Path) -> Command {
    let mut command = Command::new(marengod());
    command
        .arg("perplexity")
        .arg("--bundle")
        .arg(bundle)
        .arg("--file")
        .arg(file);
    command
}

#[test]
fn fp8_stays_within_measured_bounds_of_f32() {
    let (fp8, f32) = bundles();
    let out = run(perplexity(fp8, &text()).arg("--reference").arg(f32).args([
        "--context",
        WINDOW,
        "--json",
    ]));
    println!("{out}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    let figure = |pointer: &str| {
        line.pointer(pointer)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("no {pointer} in {line}"))
    };
    assert_eq!(figure("/tokens"), 3111.0);
    assert_eq!(figure("/windows"), 6.0);
    assert_eq!(figure("/scored_positions"), 6.0 * 255.0);

    let (ours, theirs) = (figure("/perplexity"), figure("/reference/perplexity"));
    assert!(
        (theirs / LLAMA_CPP_F32_PERPLEXITY - 1.0).abs() <= F32_PERPLEXITY_TOLERANCE,
        "the f32 bundle's perplexity {theirs} is not llama.cpp's {LLAMA_CPP_F32_PERPLEXITY}"
    );
    assert!(
        ours.is_finite() && ours >= theirs * 0.99 && ours <= theirs * MAX_PERPLEXITY_RATIO,
        "FP8 perplexity {ours} against f32's {theirs}"
    );
    let (kl_mean, kl_max) = (figure("/reference/kl_mean"), figure("/reference/kl_max"));
    assert!(
        kl_mean <= MAX_KL_MEAN && kl_max <= MAX_KL_MAX,
        "FP8 strays from f32: KL mean {kl_mean}, max {kl_max}"
    );
    let top1 = figure("/reference/top1_agreement_percent");
    assert!(
        top1 >= MIN_TOP1_AGREEMENT_PERCENT,
        "FP8's top-1 agrees with f32's at only {top1} %"
    );
}

#[test]
fn what_cannot_be_scored_is_refused() {
    let (_, f32) = bundles();
    let dir = scratch_dir("perplexity-refusals");

    let missing = dir.join("missing.txt");
    let err = run_fails(&mut perplexity(f32, &missing));
    assert!(
        err.contains("reading") && err.contains("missing.txt"),
        "{err}"
    );

    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").expect("writing the empty text");
    let err = run_fails(&mut perplexity(f32, &empty));
    assert!(err.contains("the text is empty"), "{err}");

    // The bundle's context (4096 tokens) is the default window: the text makes no whole one.
    let err = run_fails(&mut perplexity(f32, &text()));
    assert!(
        err.contains("3111 tokens, fewer than one window of") && err.contains("--context"),
        "{err}"
    );

    // The tiny Mistral-shaped bundle has Mistral's 32000-token vocabulary.
    let err = run_fails(
        perplexity(tiny_bundle(Kind::Fp8), &text())
            .arg("--reference")
            .arg(f32)
            .args(["--context", "64"]),
    );
    assert!(
        err.contains("vocabulary (49152 tokens) is not the model's (32000)"),
        "{err}"
    );
}
