//! Structured output on real weights (SmolLM2-135M-Instruct, FP8, byte-level BPE), in process:
//! what the constraint lets through is checked by the reference tools, not by hand — the
//! `jsonschema` package validates JSON, Python's `re` matches regexes
//! (`tests/python/check_outputs.py`).
//!
//! - 50 answers sampled at temperature 1 (seeds 0..50, half of them with the sampler's filters
//!   off and a repeat penalty) under a JSON schema with a required string, an enum, an integer
//!   range and an array, through the chat template: every one ends by itself and validates.
//! - A regex-constrained continuation of a plain prompt matches its regex.
//!
//! The constraint's mean cost per token is printed beside the decode step's.

use std::path::Path;
use std::sync::Arc;

use marengo::chat::Message;
use marengo::constraint::ConstraintSpec;
use marengo::engine::{Conversation, EndReason, Engine, EngineOptions, GenerationOutcome};
use marengo::request::{Prompt, RequestOptions};
use marengo_testkit::onnxruntime::python_script;
use marengo_testkit::{scratch_dir, smollm2_bundle};

const SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "colour": {"enum": ["red", "green", "blue"]},
    "age": {"type": "integer", "minimum": 18, "maximum": 99},
    "hobbies": {
      "type": "array",
      "items": {"type": "string", "maxLength": 10},
      "minItems": 1,
      "maxItems": 2
    }
  },
  "required": ["name", "colour", "age", "hobbies"],
  "additionalProperties": false
}"#;
const SAMPLES: u64 = 50;
/// The longest answer the schema allows is about 70 characters; a token is at least one byte.
const MAX_TOKENS: u32 = 128;

fn load() -> Arc<Engine> {
    Engine::load(smollm2_bundle(), &EngineOptions::default()).expect("SmolLM2 loads")
}

fn generate(
    engine: &Engine,
    conversation: &mut Conversation,
    prompt: Prompt,
    options: RequestOptions,
) -> (String, GenerationOutcome) {
    let request = engine
        .text()
        .prepare(prompt, options, MAX_TOKENS)
        .expect("the request is accepted");
    let mut text = String::new();
    let outcome = conversation
        .generate(&request, &|| None, &mut |piece| text.push_str(piece))
        .expect("generation runs");
    (text, outcome)
}

/// `check_outputs.py`'s failures for `outputs`, with `how` (`--json-schema FILE` or
/// `--regex RE`).
fn failures(dir: &Path, outputs: &[String], how: [&str; 2]) -> Vec<serde_json::Value> {
    let path = dir.join("outputs.json");
    std::fs::write(&path, serde_json::to_string(outputs).unwrap()).unwrap();
    let report = python_script("check_outputs.py", [path.to_str().unwrap(), how[0], how[1]]);
    let report: serde_json::Value = serde_json::from_str(&report).expect("one JSON line");
    assert_eq!(report["checked"], outputs.len());
    report["failures"].as_array().expect("a list").clone()
}

#[test]
fn sampled_answers_under_a_json_schema_all_validate() {
    let dir = scratch_dir("structured_output_json");
    let schema_path = dir.join("schema.json");
    std::fs::write(&schema_path, SCHEMA).unwrap();
    let engine = load();
    let mut conversation = engine.new_conversation().expect("conversation");
    let prompt = Prompt::Chat(vec![Message::user(
        "Invent a person and describe them as JSON: name, favourite colour, age, hobbies.",
    )]);

    let mut outputs = Vec::new();
    let (mut constraint_s, mut tokens, mut decode_s) = (0.0, 0, 0.0);
    for seed in 0..SAMPLES {
        let unfiltered = seed % 2 == 1;
        let options = RequestOptions {
            temperature: Some(1.0),
            seed: Some(seed),
            top_k: unfiltered.then_some(0),
            top_p: unfiltered.then_some(1.0),
            min_p: unfiltered.then_some(0.0),
            repeat_penalty: unfiltered.then_some(1.1),
            constraint: Some(ConstraintSpec::JsonSchema(SCHEMA.into())),
            ..RequestOptions::default()
        };
        let (text, outcome) = generate(&engine, &mut conversation, prompt.clone(), options);
        assert_eq!(
            outcome.reason,
            EndReason::Stop,
            "seed {seed}: the answer did not end by itself: {text:?}"
        );
        let n = outcome.generated_tokens as f64;
        constraint_s += outcome
            .constraint_s_per_token
            .expect("a constrained request")
            * n;
        decode_s += n / outcome.decode_tokens_per_s.max(f64::MIN_POSITIVE);
        tokens += outcome.generated_tokens;
        outputs.push(text);
    }
    println!("first answers: {:?}", &outputs[..4]);
    println!(
        "{tokens} tokens: constraint {:.3} ms per token, decode step {:.3} ms per token",
        constraint_s * 1e3 / tokens as f64,
        decode_s * 1e3 / tokens as f64
    );
    let failed = failures(
        &dir,
        &outputs,
        ["--json-schema", schema_path.to_str().unwrap()],
    );
    assert!(
        failed.is_empty(),
        "answers that do not validate: {failed:#?}"
    );
}

#[test]
fn a_regex_constrained_continuation_matches_the_regex() {
    // Non-ASCII too: byte-level BPE spells `é` and `☕` with its byte-to-character map.
    const REGEX: &str = "(yes|no), because [a-zé]+( [a-zé]+){2,5} ☕";
    let dir = scratch_dir("structured_output_regex");
    let engine = load();
    let mut conversation = engine.new_conversation().expect("conversation");
    let options = RequestOptions {
        temperature: Some(0.7),
        seed: Some(7),
        constraint: Some(ConstraintSpec::Regex(REGEX.into())),
        ..RequestOptions::default()
    };
    let prompt = Prompt::Text("Question: is the sea salty? Answer:".into());
    let (text, outcome) = generate(&engine, &mut conversation, prompt, options);
    println!("{text:?}");
    assert_eq!(outcome.reason, EndReason::Stop, "{text:?}");
    let failed = failures(&dir, &[text], ["--regex", REGEX]);
    assert!(failed.is_empty(), "{failed:#?}");
}
