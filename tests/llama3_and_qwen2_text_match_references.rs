//! Llama 3's and Qwen2's text side as the daemon runs it, against references made without it:
//!
//! - the `tokenizer.json` the exporter rebuilds from a GGUF's tokenizer metadata (the text it
//!   writes into the bundle), read by marengo's own [`Tokenizer`], gives HuggingFace's ids on
//!   llama.cpp's test texts (the `.gguf.out` files, written with AutoTokenizer on the models'
//!   tokenizer.json) and the models' original tokenizers' ids on a corpus of digits, code, CJK,
//!   emoji, mixed whitespace and special tokens (`tests/fixtures/text/*-tokenization.json`);
//! - special tokens are single ids, marked special;
//! - the ids that end generation include each family's end-of-turn token;
//! - the models' chat templates rendered by marengo equal transformers' `apply_chat_template`,
//!   and their renderings tokenize to the original tokenizers' ids (`tests/fixtures/text/chat.json`).
//!
//! The vocabularies are llama.cpp's test GGUFs (vocabulary only, no weights), from the
//! llama-cpp-python sdist: `.ci/llama-vocab.sh` fetches them into a cache and prints the
//! directory (or set `MARENGO_LLAMA_VOCAB`). These tests fail, rather than skip, without them.
//! References: `tests/python/make_text_refs.py`.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use marengo::chat::{ChatTemplate, Message};
use marengo::tokenizer::Tokenizer;
use marengo_export::gguf::GgufFile;
use marengo_export::gguf::tokenizer::GgufTokenizer;
use marengo_testkit::files::sha256_file;
use marengo_testkit::fixtures;
use serde::Deserialize;

/// What llama.cpp's test files separate their texts with.
const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

fn vocab_dir() -> PathBuf {
    let dir = std::env::var_os("MARENGO_LLAMA_VOCAB")
        .map(PathBuf::from)
        .unwrap_or_else(|| marengo_testkit::cache_dir().join("llama-vocab"));
    assert!(
        dir.join("ggml-vocab-llama-bpe.gguf").is_file(),
        "{} has no vocabulary GGUFs: run .ci/llama-vocab.sh (or set MARENGO_LLAMA_VOCAB)",
        dir.display()
    );
    dir
}

/// A family's vocabulary GGUF, its rebuilt tokenizer, and that tokenizer as the daemon loads it.
struct Family {
    gguf: &'static str,
    fixture: &'static str,
    rebuilt: GgufTokenizer,
    tokenizer: Tokenizer,
}

fn load(gguf: &'static str, fixture: &'static str) -> Family {
    let file = GgufFile::open(&vocab_dir().join(format!("ggml-vocab-{gguf}.gguf"))).unwrap();
    let rebuilt = GgufTokenizer::from_metadata(&file.index().metadata).unwrap();
    let tokenizer = Tokenizer::from_bytes(rebuilt.json.as_bytes()).unwrap();
    Family {
        gguf,
        fixture,
        rebuilt,
        tokenizer,
    }
}

fn llama3() -> &'static Family {
    static FAMILY: OnceLock<Family> = OnceLock::new();
    FAMILY.get_or_init(|| load("llama-bpe", "llama3"))
}

fn qwen2() -> &'static Family {
    static FAMILY: OnceLock<Family> = OnceLock::new();
    FAMILY.get_or_init(|| load("qwen2", "qwen2"))
}

#[derive(Deserialize)]
struct Tokenization {
    gguf_sha256: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

/// llama.cpp's test texts with HuggingFace's ids for them.
fn huggingface_cases(family: &Family) -> Vec<Case> {
    let read = |extension: &str| {
        let path = vocab_dir().join(format!("ggml-vocab-{}.gguf.{extension}", family.gguf));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let (texts, lines) = (read("inp"), read("out"));
    let texts: Vec<&str> = texts.split(SEPARATOR).collect();
    let lines: Vec<&str> = lines.split('\n').collect();
    assert_eq!(
        texts.len(),
        lines.len(),
        "{}: .inp and .out disagree",
        family.gguf
    );
    texts
        .iter()
        .zip(&lines)
        .filter(|(text, line)| !(text.is_empty() && line.is_empty()))
        .map(|(text, line)| Case {
            text: (*text).to_owned(),
            ids: line
                .split_whitespace()
                .map(|id| id.parse().unwrap())
                .collect(),
        })
        .collect()
}

fn original_cases(family: &Family) -> Vec<Case> {
    let path = fixtures().join(format!("text/{}-tokenization.json", family.fixture));
    let fixture: Tokenization = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let gguf = vocab_dir().join(format!("ggml-vocab-{}.gguf", family.gguf));
    assert_eq!(
        sha256_file(&gguf),
        fixture.gguf_sha256,
        "{} was made from another GGUF",
        path.display()
    );
    fixture.cases
}

/// Every case encodes to its ids (special tokens recognised, nothing added) and decodes back to
/// its text, NFC-normalized where the family normalizes.
fn assert_tokenizes(family: &Family, reference: &str, cases: &[Case], nfc: bool) {
    let mut mismatches = Vec::new();
    for case in cases {
        let ids = family.tokenizer.encode(&case.text, false).unwrap();
        if ids != case.ids {
            mismatches.push(format!(
                "{:?}\n  {reference}: {:?}\n  marengo: {:?}",
                case.text, case.ids, ids
            ));
            continue;
        }
        let decoded = family.tokenizer.decode(&ids, false).unwrap();
        if !nfc {
            assert_eq!(decoded, case.text, "decoding does not round-trip");
        }
    }
    assert!(
        mismatches.is_empty(),
        "{}: {} of {} texts differ from {reference}:\n{}",
        family.gguf,
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

#[test]
fn llama3_tokenizer_from_gguf_equals_huggingface_and_meta() {
    let family = llama3();
    let hf = huggingface_cases(family);
    assert!(hf.len() >= 40, "llama.cpp's test texts shrank");
    assert_tokenizes(family, "HuggingFace", &hf, false);
    let original = original_cases(family);
    assert!(original.len() >= 45, "the corpus shrank");
    assert_tokenizes(family, "Meta's tiktoken", &original, false);
}

#[test]
fn qwen2_tokenizer_from_gguf_equals_huggingface_and_qwen() {
    let family = qwen2();
    let hf = huggingface_cases(family);
    assert!(hf.len() >= 40, "llama.cpp's test texts shrank");
    assert_tokenizes(family, "HuggingFace", &hf, true);
    let original = original_cases(family);
    assert!(original.len() >= 45, "the corpus shrank");
    assert_tokenizes(family, "Qwen's tiktoken", &original, true);
    // NFC: a decomposed accent tokenizes as the composed one.
    let tokenizer = &family.tokenizer;
    assert_eq!(
        tokenizer.encode("Cafe\u{301}", false).unwrap(),
        tokenizer.encode("Caf\u{e9}", false).unwrap()
    );
}

#[test]
fn special_tokens_are_single_special_ids() {
    for (family, specials, bos) in [
        (
            llama3(),
            &[
                ("<|begin_of_text|>", 128000),
                ("<|end_of_text|>", 128001),
                ("<|start_header_id|>", 128006),
                ("<|end_header_id|>", 128007),
                ("<|eot_id|>", 128009),
            ][..],
            Some(128000),
        ),
        (
            qwen2(),
            &[
                ("<|endoftext|>", 151643),
                ("<|im_start|>", 151644),
                ("<|im_end|>", 151645),
            ][..],
            None,
        ),
    ] {
        let tokenizer = &family.tokenizer;
        for &(text, id) in specials {
            assert_eq!(tokenizer.encode(text, false).unwrap(), vec![id], "{text}");
            assert!(tokenizer.is_special(id), "{text} is not marked special");
            // Not shown in a stream, but kept when asked for.
            assert_eq!(tokenizer.decode(&[id], true).unwrap(), "");
            assert_eq!(tokenizer.decode(&[id], false).unwrap(), text);
        }
        let hello = tokenizer.encode("Hello", false).unwrap();
        let with_specials = tokenizer.encode("Hello", true).unwrap();
        // Llama 3 adds <|begin_of_text|>, as its tokenizer.json does; Qwen2 adds nothing.
        assert_eq!(
            with_specials,
            bos.into_iter().chain(hello).collect::<Vec<_>>(),
            "{}",
            family.gguf
        );
    }
}

#[test]
fn generation_stops_at_end_of_turn_tokens() {
    // ggml-vocab-llama-bpe.gguf is Meta-Llama-3-8B's (EOS <|end_of_text|>): the instruct
    // models' <|eot_id|> must stop generation too. Qwen's names <|endoftext|>; ChatML ends
    // turns with <|im_end|>.
    assert_eq!(llama3().rebuilt.stop_ids(), vec![128001, 128009]);
    assert_eq!(qwen2().rebuilt.stop_ids(), vec![151643, 151645]);
}

#[derive(Deserialize)]
struct ChatFixture {
    /// The time `strftime_now` formats, in seconds since the epoch.
    now_unix: u64,
    conversations: std::collections::BTreeMap<String, Vec<FixtureMessage>>,
    renderings: Vec<Rendering>,
}

#[derive(Deserialize)]
struct FixtureMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Rendering {
    template: String,
    bos_token: Option<String>,
    eos_token: String,
    conversation: String,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

#[test]
fn chat_templates_render_like_transformers() {
    let path = fixtures().join("text/chat.json");
    let fixture: ChatFixture = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(fixture.now_unix);
    let mut checked = 0;
    for rendering in &fixture.renderings {
        let family = if rendering.template.starts_with("llama") {
            llama3()
        } else {
            qwen2()
        };
        let template = if rendering.template.ends_with(".gguf") {
            // The template the exporter takes from the GGUF into the manifest.
            assert_eq!(
                rendering.template,
                format!("ggml-vocab-{}.gguf", family.gguf)
            );
            family
                .rebuilt
                .chat_template
                .clone()
                .expect("the GGUF has a template")
        } else {
            std::fs::read_to_string(fixtures().join("text").join(&rendering.template)).unwrap()
        };
        let template = ChatTemplate::new(
            &template,
            rendering.bos_token.as_deref().unwrap_or(""),
            &rendering.eos_token,
        )
        .unwrap();
        let messages: Vec<Message> = fixture.conversations[&rendering.conversation]
            .iter()
            .map(|m| Message::new(&m.role, &m.content))
            .collect();
        let what = format!(
            "{} / {} / add_generation_prompt {}",
            rendering.template, rendering.conversation, rendering.add_generation_prompt
        );
        let text = template
            .render_at(&messages, rendering.add_generation_prompt, now)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(text, rendering.text, "{what}");
        // As the daemon encodes a chat prompt: specials recognised, no BOS added.
        let ids = family.tokenizer.encode(&text, false).unwrap();
        assert_eq!(ids, rendering.ids, "{what}");
        checked += 1;
    }
    assert_eq!(checked, 24, "renderings were dropped");
}
