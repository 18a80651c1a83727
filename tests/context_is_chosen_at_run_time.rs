//! The context is chosen when the model is loaded, not when the bundle is written: a bundle
//! holds the rotary caches of the model's maximum, runs with its default context unless told
//! otherwise, and with any context up to the maximum when asked (`--context`, key `context`),
//! the KV cache, the request check and the listed models following the choice.
//!
//! One f32 bundle of a tiny Llama whose maximum is 8192 positions (default 4096), checked
//! against transformers' logits past position 4096 (`tests/fixtures/golden/llama-long.*`,
//! made by `make_golden.py`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use marengo::engine::{Engine, EngineOptions};
use marengo::models::Models;
use marengo::request::{Prompt, RequestError, RequestOptions};
use marengo_bundle::Bundle;
use marengo_bundle::layout::ROPE_COS;
use marengo_testkit::binaries::marengod;
use marengo_testkit::exporter::{convert, synth, tokenizer_fixture};
use marengo_testkit::{fixtures, max_abs_diff, repo_root, run_fails, scratch_dir};
use safetensors::SafeTensors;

const TOLERANCE: f32 = 1e-3;
const MAX: usize = 8192;
const DEFAULT: usize = 4096;

struct LongGolden {
    config: PathBuf,
    synth_args: Vec<String>,
    ids: Vec<u32>,
    /// `[tail, vocab]`: the last `tail` positions' logits.
    logits: Vec<f32>,
    tail: usize,
}

fn golden() -> LongGolden {
    let dir = fixtures().join("golden");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("llama-long.json")).expect("golden"))
            .expect("golden json");
    let bytes = std::fs::read(dir.join("llama-long.safetensors")).expect("golden logits");
    let tensors = SafeTensors::deserialize(&bytes).expect("golden safetensors");
    let logits = tensors
        .tensor("logits")
        .expect("logits")
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let strings = |key: &str| -> Vec<String> {
        meta[key]
            .as_array()
            .expect(key)
            .iter()
            .map(|v| v.as_str().expect(key).to_owned())
            .collect()
    };
    LongGolden {
        config: repo_root().join(meta["config"].as_str().expect("config")),
        synth_args: strings("synth_args"),
        ids: meta["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect(),
        logits,
        tail: meta["logits_shape"][0].as_u64().expect("tail") as usize,
    }
}

/// The f32 bundle of the golden's checkpoint, exported once with the exporter's defaults.
fn bundle() -> &'static Path {
    static BUNDLE: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let golden = golden();
        let scratch = scratch_dir("context_at_run_time");
        let checkpoint = scratch.join("checkpoint");
        let mut args = golden.synth_args.clone();
        args.push("--tokenizer".into());
        args.push(tokenizer_fixture().display().to_string());
        synth(&golden.config, &checkpoint, &args);
        let out = scratch.join("bundle");
        convert(&checkpoint, &out, &["--dtype", "f32"]);
        out
    })
}

fn load(context: Option<usize>) -> Arc<Engine> {
    let options = EngineOptions {
        context,
        ..EngineOptions::default()
    };
    Engine::load(bundle(), &options).expect("bundle loads")
}

#[test]
fn the_bundle_covers_the_maximum_and_runs_the_default() {
    let opened = Bundle::open(bundle()).expect("bundle opens");
    let arch = &opened.manifest().architecture;
    assert_eq!((arch.context_length, arch.max_context()), (DEFAULT, MAX));
    assert_eq!(opened.tensor(ROPE_COS).expect("cos").shape, vec![MAX, 8]);
    let engine = load(None);
    assert_eq!(engine.text().context_length(), DEFAULT);
    let mut sequence = engine.new_sequence().expect("sequence");
    assert_eq!(sequence.context_length(), DEFAULT);
    let too_long = vec![1; DEFAULT + 1];
    assert!(sequence.feed(&too_long).is_err());
}

/// A run at 4200 positions: the first 4096 tokens fed as one prompt (chunked), then each of
/// the last 8 through the KV cache, every one of whose logits must be transformers'.
#[test]
fn a_longer_context_matches_transformers_past_the_default() {
    let golden = golden();
    let engine = load(Some(4200));
    assert_eq!(engine.text().context_length(), 4200);
    let mut sequence = engine.new_sequence().expect("sequence");
    let split = golden.ids.len() - golden.tail;
    assert!(split >= DEFAULT, "the golden ends past the default context");
    sequence.feed(&golden.ids[..split]).expect("prefill");
    let mut logits = Vec::new();
    for &id in &golden.ids[split..] {
        logits.extend(sequence.feed(&[id]).expect("decode step"));
    }
    let worst = max_abs_diff(&logits, &golden.logits);
    println!(
        "logits at positions {split}..{}: max |diff| {worst:.3e}",
        golden.ids.len()
    );
    assert!(worst <= TOLERANCE, "logits differ by {worst}");
}

#[test]
fn a_shorter_context_shrinks_what_a_conversation_holds() {
    let engine = load(Some(16));
    let text = engine.text();
    assert_eq!(text.context_length(), 16);
    let prepare = |n: usize| {
        text.prepare(
            Prompt::Ids(vec![5; n]),
            RequestOptions::default(),
            marengo_client::defaults::MAX_TOKENS,
        )
    };
    prepare(15).expect("15 tokens leave one to generate");
    match prepare(16) {
        Err(RequestError::ContextOverflow { context_length, .. }) => {
            assert_eq!(context_length, 16)
        }
        other => panic!("16 tokens in a context of 16: {:?}", other.map(|_| ())),
    }
    let mut sequence = engine.new_sequence().expect("sequence");
    assert_eq!(sequence.context_length(), 16);
    assert!(sequence.feed(&[5; 17]).is_err());

    // The models the daemon lists (its `Models` and `ContextLength` properties) state the
    // chosen context too.
    let models = Models::new(Vec::new(), Some(bundle().to_owned()), None).with_context(Some(16));
    let listed = models.list();
    assert_eq!(listed[0].context_length, 16);
    assert_eq!(
        models.text(&listed[0]).expect("text side").context_length(),
        16
    );
}

#[test]
fn a_context_beyond_the_maximum_is_refused_naming_both() {
    let err = run_fails(Command::new(marengod()).args([
        "generate",
        "--bundle",
        bundle().to_str().expect("UTF-8 path"),
        "--prompt-ids",
        "1,2",
        "--max-tokens",
        "1",
        "--context",
        "8193",
    ]));
    assert!(
        err.contains("context of 8193 tokens") && err.contains("maximum of 8192"),
        "{err}"
    );
}
