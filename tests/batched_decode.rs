//! Sequences that decode together, one forward pass for all of them, get the greedy tokens
//! each gets alone, on f32 and FP8 bundles and on SmolLM2: whatever their lengths, when one
//! joins while the others are mid-answer, and when a lane's cache is cut back to a shorter
//! prefix and continued.

use std::sync::Arc;

use marengo::engine::{Engine, EngineOptions};
use marengo_testkit::{Kind, argmax, smollm2_bundle, tiny_bundle};

const STEPS: usize = 12;

fn load(dir: &std::path::Path) -> Arc<Engine> {
    Engine::load(dir, &EngineOptions::default()).expect("bundle loads")
}

/// Greedy tokens and the logits they were chosen from, one sequence alone.
fn alone(engine: &Engine, prompt: &[u32]) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut sequence = engine.new_sequence().expect("sequence");
    let mut logits = sequence.feed(prompt).expect("prompt");
    let (mut tokens, mut seen) = (Vec::new(), Vec::new());
    for _ in 0..STEPS {
        let id = argmax(&logits);
        tokens.push(id);
        seen.push(logits);
        logits = sequence.feed(&[id]).expect("step");
    }
    (tokens, seen)
}

/// The same, for every prompt at once: prompt `i` joins after `joins[i]` steps of the
/// others, and every step advances every lane that has joined in one pass.
fn together(
    engine: &Engine,
    prompts: &[Vec<u32>],
    joins: &[usize],
) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let mut lanes = engine.new_lanes(prompts.len()).expect("lanes");
    let mut results = vec![(Vec::new(), Vec::new()); prompts.len()];
    let mut next: Vec<Option<Vec<f32>>> = vec![None; prompts.len()];
    for step in 0.. {
        for (lane, prompt) in prompts.iter().enumerate() {
            if joins[lane] == step {
                next[lane] = Some(lanes.feed(lane, prompt).expect("prompt"));
            }
        }
        let mut batch = Vec::new();
        for (lane, logits) in next.iter_mut().enumerate() {
            let Some(logits) = logits.take() else {
                continue;
            };
            let (tokens, seen) = &mut results[lane];
            if tokens.len() == STEPS {
                continue;
            }
            let id = argmax(&logits);
            tokens.push(id);
            seen.push(logits);
            batch.push((lane, id));
        }
        if batch.is_empty() && step > *joins.iter().max().unwrap() {
            break;
        }
        if batch.is_empty() {
            continue;
        }
        let logits = lanes.step(&batch).expect("batched step");
        let vocab = logits.len() / batch.len();
        for ((lane, _), row) in batch.iter().zip(logits.chunks_exact(vocab)) {
            next[*lane] = Some(row.to_vec());
        }
    }
    results
}

fn assert_same(engine: &Engine, prompts: &[Vec<u32>], joins: &[usize], tolerance: f32) {
    let batched = together(engine, prompts, joins);
    for (prompt, (tokens, logits)) in prompts.iter().zip(&batched) {
        let (alone_tokens, alone_logits) = alone(engine, prompt);
        assert_eq!(tokens, &alone_tokens, "greedy tokens of {prompt:?}");
        for (step, (a, b)) in logits.iter().zip(&alone_logits).enumerate() {
            let diff = marengo_testkit::max_abs_diff(a, b);
            assert!(
                diff <= tolerance,
                "{prompt:?} step {step}: logits differ by {diff}"
            );
        }
    }
}

fn tiny_prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 42, 9, 100, 3, 77],
        vec![11, 2],
        (1..40).map(|i| (i * 7 % 250) as u32 + 1).collect(),
    ]
}

#[test]
fn batched_greedy_tokens_equal_alone_on_tiny_bundles() {
    for kind in [Kind::F32, Kind::Fp8, Kind::Fp8Block(32)] {
        let engine = load(tiny_bundle(kind));
        assert_same(&engine, &tiny_prompts(), &[0, 0, 0], 1e-4);
        assert_same(&engine, &tiny_prompts(), &[0, 3, 7], 1e-4);
    }
}

#[test]
fn batched_greedy_tokens_equal_alone_on_smollm2() {
    let engine = load(smollm2_bundle());
    let tokenizer = engine.tokenizer();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "1, 2, 3, 4,",
    ]
    .iter()
    .map(|text| tokenizer.encode(text, true).expect("encodes"))
    .collect();
    assert_same(&engine, &prompts, &[0, 0, 2, 5], 1e-3);
}

/// A lane cut back to a prefix of what it holds continues as a fresh sequence fed that
/// prefix would: the positions past the cut are written over.
#[test]
fn a_lane_cut_back_continues_like_a_fresh_one() {
    let engine = load(tiny_bundle(Kind::Fp8));
    let mut lanes = engine.new_lanes(2).expect("lanes");
    let first: Vec<u32> = vec![5, 17, 42, 9, 100, 3, 77, 8, 8, 1];
    lanes.feed(1, &first).expect("prompt");
    let edited: Vec<u32> = vec![5, 17, 42, 9, 60, 61];
    let kept = lanes.reuse_prefix(1, &edited).expect("reuse");
    assert_eq!(kept, 4);
    assert_eq!(lanes.cached(1), &edited[..4]);
    let logits = lanes.feed(1, &edited[4..]).expect("rest");
    let mut fresh = engine.new_sequence().expect("sequence");
    let expected = fresh.feed(&edited).expect("fresh");
    assert!(marengo_testkit::max_abs_diff(&logits, &expected) <= 1e-5);
    assert_eq!(argmax(&logits), argmax(&expected));
    lanes.reset(1).expect("reset");
    assert!(lanes.cached(1).is_empty());
    let again = lanes.feed(1, &edited).expect("after reset");
    assert!(marengo_testkit::max_abs_diff(&again, &expected) <= 1e-5);
}
