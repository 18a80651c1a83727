//! The sentencepiece ("llama") path of the GGUF tokenizer rebuild against llama.cpp: Mistral-7B
//! v0.1's vocabulary as a vocabulary-only GGUF, and the ids llama.cpp gave for a corpus
//! (`tests/fixtures/gguf/make_spm_vocab.py`).

use marengo_export::gguf::GgufFile;
use marengo_export::gguf::tokenizer::GgufTokenizer;
use marengo_testkit::fixtures;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn sentencepiece_vocabulary_tokenizes_as_llama_cpp() {
    let dir = fixtures().join("gguf");
    let fixture: Fixture =
        serde_json::from_slice(&std::fs::read(dir.join("spm_tokenization.json")).unwrap()).unwrap();
    let file = GgufFile::open(&dir.join("mistral-spm-vocab.gguf")).unwrap();
    let rebuilt = GgufTokenizer::from_metadata(&file.index().metadata).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_bytes(rebuilt.json.as_bytes()).unwrap();
    let mismatches: Vec<String> = fixture
        .cases
        .iter()
        .filter_map(|case| {
            let ids = tokenizer
                .encode(case.text.as_str(), true)
                .unwrap()
                .get_ids()
                .to_vec();
            (ids != case.ids).then(|| {
                format!(
                    "{:?}\n  llama.cpp: {:?}\n  rebuilt:   {:?}",
                    case.text, case.ids, ids
                )
            })
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} lines differ:\n{}",
        mismatches.len(),
        fixture.cases.len(),
        mismatches.join("\n")
    );
    assert!(fixture.cases.len() >= 15);
}
