//! A HuggingFace `tokenizer.json` rebuilt from a GGUF file's tokenizer metadata.
//!
//! GGUF carries the vocabulary (`tokenizer.ggml.tokens`, `token_type`, and `merges` or `scores`)
//! but not the rules around it; those are implied by `tokenizer.ggml.model` and
//! `tokenizer.ggml.pre` and live in llama.cpp's code. This module states them in the terms of
//! the `tokenizers` crate, which the daemon runs:
//!
//! - `gpt2`: byte-level BPE with the GGUF's merges; the pre-tokenizer is the regex cascade the
//!   `pre` name stands for ([`super::pretokenizer`]) followed by the byte-to-unicode mapping,
//!   after NFC where the family's own tokenizer normalizes (Qwen2).
//! - `llama`: sentencepiece-style BPE over `▁`-marked text with byte fallback. Sentencepiece
//!   merges the adjacent pair whose union scores highest; BPE merges the pair of lowest rank, so
//!   the merges are generated from the vocabulary and ranked by the score of their result.
//!
//! Tokens typed control or unknown become special added tokens and user-defined ones plain added
//! tokens: both are cut out of the text before the model runs, as llama.cpp does when it parses
//! special tokens. The tokenizer is assembled through the crate's own types, so what is written
//! is what the crate loads.
//!
//! Both paths are checked against llama.cpp's own tokenization: `gpt2` on SmolLM2's GGUF
//! (`tests/fixtures/smollm2/`), `llama` on Mistral-7B v0.1's vocabulary
//! (`tests/fixtures/gguf/spm_tokenization.json`); `gpt2` also against HuggingFace's tokenizers
//! of Llama 3 and Qwen2 and their original tiktoken vocabularies
//! (`tests/llama3_and_qwen2_text_match_references.rs`).

use std::collections::{BTreeMap, HashMap};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab as BpeVocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use super::pretokenizer;
use super::value::Value;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Sentencepiece's word-boundary marker.
const SPM_SPACE: char = '\u{2581}';

/// Why the GGUF's tokenizer metadata cannot be turned into a `tokenizer.json`.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("metadata key {0} is missing")]
    Missing(&'static str),
    #[error("metadata key {key} is {found}, expected {expected}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("metadata key {key} has {len} entries for {vocab} tokens")]
    LengthMismatch {
        key: &'static str,
        len: usize,
        vocab: usize,
    },
    #[error("tokenizer.ggml.model {0:?} is not supported (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("tokenizer.ggml.pre {0:?} is not known (known: {known})", known = pretokenizer::KNOWN)]
    UnsupportedPreTokenizer(String),
    #[error(
        "tokenizer.ggml.merges entry {index} ({merge:?}) is not two tokens separated by a space"
    )]
    BadMerge { index: usize, merge: String },
    #[error("metadata key {key} = {id} is not a token id (vocabulary of {vocab})")]
    IdOutOfRange {
        key: &'static str,
        id: u64,
        vocab: usize,
    },
    #[error("the tokenizers crate refused the tokenizer: {0}")]
    Build(String),
}

fn build_error(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

/// Special token ids from the metadata, validated against the vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` and `eom_token_id`: the end of a turn and of a message
    /// (Llama 3.1's `<|eom_id|>`), which end generation like EOS.
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// A tokenizer rebuilt from GGUF metadata.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The `tokenizer.json` text.
    pub json: String,
    pub special: SpecialTokens,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
    /// The control tokens (`<|eot_id|>`, `<|im_end|>`), which the tokenizer marks special.
    control_tokens: Vec<(String, u32)>,
}

/// The tokenizer metadata of a GGUF file, read and cross-checked.
struct Vocab<'a> {
    tokens: &'a [String],
    types: Vec<i64>,
}

impl GgufTokenizer {
    /// Builds the tokenizer described by the `tokenizer.*` keys of a GGUF file's metadata.
    pub fn from_metadata(metadata: &BTreeMap<String, Value>) -> Result<Self, TokenizerError> {
        let index = &Metadata(metadata);
        let model = string(index, "tokenizer.ggml.model")?
            .ok_or(TokenizerError::Missing("tokenizer.ggml.model"))?;
        let tokens = index
            .get("tokenizer.ggml.tokens")
            .ok_or(TokenizerError::Missing("tokenizer.ggml.tokens"))?;
        let tokens = tokens
            .as_array()
            .and_then(|a| a.as_strings())
            .ok_or_else(|| wrong_type("tokenizer.ggml.tokens", "array of string", tokens))?;
        let types = match index.get("tokenizer.ggml.token_type") {
            None => vec![TYPE_NORMAL; tokens.len()],
            Some(v) => {
                let types = v
                    .as_array()
                    .and_then(|a| a.to_i64s())
                    .ok_or_else(|| wrong_type("tokenizer.ggml.token_type", "array of int", v))?;
                check_len("tokenizer.ggml.token_type", types.len(), tokens.len())?;
                types
            }
        };
        let vocab = Vocab { tokens, types };

        let (mut tokenizer, default_add_bos) = match model {
            "gpt2" => byte_level_bpe(index, &vocab)?,
            "llama" => sentencepiece_bpe(index, &vocab)?,
            other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
        };

        let id = |key: &'static str| token_id(index, key, tokens.len());
        let special = SpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            eom: id("tokenizer.ggml.eom_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: boolean(index, "tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos),
            add_eos: boolean(index, "tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        };

        let added: Vec<AddedToken> = vocab
            .tokens
            .iter()
            .zip(&vocab.types)
            .filter_map(|(token, &ty)| match ty {
                TYPE_CONTROL | TYPE_UNKNOWN => Some(AddedToken::from(token.clone(), true)),
                TYPE_USER_DEFINED => Some(AddedToken::from(token.clone(), false).normalized(false)),
                _ => None,
            })
            .collect();
        tokenizer.add_special_tokens(&added);
        if let Some(post) = bos_eos_template(&special, tokens)? {
            tokenizer.with_post_processor(Some(post));
        }

        let json = tokenizer.to_string(false).map_err(build_error)?;
        let control_tokens = vocab
            .tokens
            .iter()
            .zip(&vocab.types)
            .enumerate()
            .filter(|&(_, (_, &ty))| ty == TYPE_CONTROL)
            .map(|(id, (token, _))| (token.clone(), id as u32))
            .collect();
        Ok(GgufTokenizer {
            json,
            special,
            chat_template: string(index, "tokenizer.chat_template")?.map(str::to_owned),
            control_tokens,
        })
    }

    /// The ids that end generation: EOS, EOT and EOM from the metadata, then the control tokens
    /// that end a turn ([`crate::checkpoint::stop_ids`]).
    pub fn stop_ids(&self) -> Vec<u32> {
        let named: Vec<u32> = [self.special.eos, self.special.eot, self.special.eom]
            .into_iter()
            .flatten()
            .collect();
        crate::checkpoint::stop_ids(
            &named,
            self.control_tokens
                .iter()
                .map(|(text, id)| (text.as_str(), *id)),
        )
    }
}

/// `gpt2`: byte-level BPE. Returns the tokenizer and llama.cpp's default for adding BOS.
fn byte_level_bpe(index: &Metadata, vocab: &Vocab) -> Result<(Tokenizer, bool), TokenizerError> {
    let pre_name = string(index, "tokenizer.ggml.pre")?.unwrap_or("default");
    let rules = pretokenizer::rules(pre_name)
        .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(pre_name.to_owned()))?;

    let merges = index
        .get("tokenizer.ggml.merges")
        .ok_or(TokenizerError::Missing("tokenizer.ggml.merges"))?;
    let merges = merges
        .as_array()
        .and_then(|a| a.as_strings())
        .ok_or_else(|| wrong_type("tokenizer.ggml.merges", "array of string", merges))?;
    let merges = merges
        .iter()
        .enumerate()
        .map(|(index, merge)| {
            split_merge(merge).ok_or_else(|| TokenizerError::BadMerge {
                index,
                merge: merge.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let model = BPE::builder()
        .vocab_and_merges(vocab_map(vocab), merges)
        .ignore_merges(rules.ignore_merges)
        .build()
        .map_err(build_error)?;
    let mut tokenizer = Tokenizer::new(model);
    if rules.nfc {
        tokenizer.with_normalizer(Some(NFC));
    }

    let mut steps = rules
        .regexes
        .iter()
        .map(|re| {
            Split::new(
                SplitPattern::Regex((*re).to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::from)
            .map_err(build_error)
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The regexes did the splitting; ByteLevel only maps bytes to its printable alphabet.
    steps.push(ByteLevel::new(false, false, false).into());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
    Ok((tokenizer, rules.add_bos_default))
}

/// `llama`: sentencepiece-style BPE with byte fallback; llama.cpp adds BOS by default.
fn sentencepiece_bpe(index: &Metadata, vocab: &Vocab) -> Result<(Tokenizer, bool), TokenizerError> {
    let scores = index
        .get("tokenizer.ggml.scores")
        .ok_or(TokenizerError::Missing("tokenizer.ggml.scores"))?;
    let scores = scores
        .as_array()
        .and_then(|a| a.to_f32s())
        .ok_or_else(|| wrong_type("tokenizer.ggml.scores", "array of float", scores))?;
    check_len("tokenizer.ggml.scores", scores.len(), vocab.tokens.len())?;
    let add_space_prefix = boolean(index, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);

    let unk =
        token_id(index, "tokenizer.ggml.unknown_token_id", vocab.tokens.len())?.or_else(|| {
            vocab
                .types
                .iter()
                .position(|&t| t == TYPE_UNKNOWN)
                .map(|i| i as u32)
        });
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab_map(vocab), spm_merges(vocab, &scores))
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(vocab.tokens[unk as usize].clone());
    }
    let mut tokenizer = Tokenizer::new(builder.build().map_err(build_error)?);

    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new(SPM_SPACE.to_string()).into());
    }
    normalizers.push(
        Replace::new(" ", SPM_SPACE.to_string())
            .map_err(build_error)?
            .into(),
    );
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));

    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPM_SPACE.to_string(), " ")
            .map_err(build_error)?
            .into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok((tokenizer, true))
}

/// The merges a sentencepiece vocabulary implies: every split of a normal token into two
/// tokens, ranked by the token's score (highest first), ties by the pair's ids as sentencepiece's
/// left-to-right scan would meet them.
fn spm_merges(vocab: &Vocab, scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = vocab
        .tokens
        .iter()
        .enumerate()
        .filter(|&(i, _)| vocab.types[i] == TYPE_NORMAL)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (&token, &id) in &ids {
        for (cut, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(cut);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                merges.push((scores[id], id, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.2, a.3).cmp(&(b.2, b.3))));
    merges
        .into_iter()
        .map(|(_, _, l, r)| (vocab.tokens[l].clone(), vocab.tokens[r].clone()))
        .collect()
}

/// Token → id, keeping the first id of a token that appears twice (the crate's vocabulary is a
/// map; llama.cpp resolves text to the first id too).
fn vocab_map(vocab: &Vocab) -> BpeVocab {
    let mut map = BpeVocab::with_capacity(vocab.tokens.len());
    for (id, token) in vocab.tokens.iter().enumerate() {
        map.entry(token.clone()).or_insert(id as u32);
    }
    if map.len() != vocab.tokens.len() {
        tracing::warn!(
            duplicates = vocab.tokens.len() - map.len(),
            "GGUF vocabulary has repeated tokens; the first id of each is used"
        );
    }
    map
}

/// `"a b"` → `("a", "b")`, cutting at the first space after the first character, as llama.cpp
/// does (a token may itself start with a space).
fn split_merge(merge: &str) -> Option<(String, String)> {
    let first = merge.chars().next()?;
    let cut = merge[first.len_utf8()..].find(' ')? + first.len_utf8();
    let (left, right) = (&merge[..cut], &merge[cut + 1..]);
    (!right.is_empty()).then(|| (left.to_owned(), right.to_owned()))
}

/// A post-processor adding BOS/EOS when the metadata asks for it, `None` otherwise.
fn bos_eos_template(
    special: &SpecialTokens,
    tokens: &[String],
) -> Result<Option<TemplateProcessing>, TokenizerError> {
    let bos = special.bos.filter(|_| special.add_bos);
    let eos = special.eos.filter(|_| special.add_eos);
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let name = |id: u32| tokens[id as usize].clone();
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some(bos) = bos {
        single.push(name(bos));
        pair.push(name(bos));
        specials.push((name(bos), bos));
    }
    single.push("$A".to_owned());
    pair.push("$A".to_owned());
    if let Some(eos) = eos {
        single.push(name(eos));
        pair.push(name(eos));
        specials.push((name(eos), eos));
    }
    if let Some(bos) = bos {
        pair.push(name(bos));
    }
    pair.push("$B:1".to_owned());
    if let Some(eos) = eos {
        pair.push(name(eos));
    }
    specials.dedup();
    TemplateProcessing::builder()
        .try_single(single.join(" "))
        .map_err(build_error)?
        .try_pair(pair.join(" "))
        .map_err(build_error)?
        .special_tokens(specials)
        .build()
        .map(Some)
        .map_err(build_error)
}

/// The metadata map, looked up by key.
struct Metadata<'a>(&'a BTreeMap<String, Value>);

impl<'a> Metadata<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }
}

fn wrong_type(key: &'static str, expected: &'static str, found: &Value) -> TokenizerError {
    TokenizerError::WrongType {
        key,
        expected,
        found: found.type_name(),
    }
}

fn check_len(key: &'static str, len: usize, vocab: usize) -> Result<(), TokenizerError> {
    if len == vocab {
        Ok(())
    } else {
        Err(TokenizerError::LengthMismatch { key, len, vocab })
    }
}

fn string<'a>(index: &Metadata<'a>, key: &'static str) -> Result<Option<&'a str>, TokenizerError> {
    index
        .get(key)
        .map(|v| v.as_str().ok_or_else(|| wrong_type(key, "string", v)))
        .transpose()
}

fn boolean(index: &Metadata, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    index
        .get(key)
        .map(|v| v.as_bool().ok_or_else(|| wrong_type(key, "bool", v)))
        .transpose()
}

fn token_id(
    index: &Metadata,
    key: &'static str,
    vocab: usize,
) -> Result<Option<u32>, TokenizerError> {
    let Some(value) = index.get(key) else {
        return Ok(None);
    };
    let id = value
        .as_u64()
        .ok_or_else(|| wrong_type(key, "an unsigned integer", value))?;
    if id >= vocab as u64 {
        return Err(TokenizerError::IdOutOfRange { key, id, vocab });
    }
    Ok(Some(id as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Array;

    /// A sentencepiece-style vocabulary: unk, bos, eos, 256 byte tokens, then pieces whose scores
    /// make `ab` merge before `▁a`.
    fn spm_metadata() -> BTreeMap<String, Value> {
        let mut tokens = vec!["<unk>".to_owned(), "<s>".into(), "</s>".into()];
        let mut types = vec![TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL];
        let mut scores = vec![0f32; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (piece, score) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("▁a", -5.0),
            ("ab", -0.5),
            ("▁ab", -0.2),
        ] {
            tokens.push(piece.to_owned());
            types.push(TYPE_NORMAL);
            scores.push(score);
        }
        let types = types.into_iter().map(|t| t as i32).collect();
        BTreeMap::from([
            (
                "tokenizer.ggml.model".to_owned(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_owned(),
                Value::Array(Array::String(tokens)),
            ),
            (
                "tokenizer.ggml.token_type".to_owned(),
                Value::Array(Array::I32(types)),
            ),
            (
                "tokenizer.ggml.scores".to_owned(),
                Value::Array(Array::F32(scores)),
            ),
            ("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id".to_owned(), Value::U32(0)),
        ])
    }

    fn load(rebuilt: &GgufTokenizer) -> Tokenizer {
        Tokenizer::from_bytes(rebuilt.json.as_bytes()).unwrap()
    }

    #[test]
    fn sentencepiece_merges_follow_scores_and_fall_back_to_bytes() {
        let rebuilt = GgufTokenizer::from_metadata(&spm_metadata()).unwrap();
        assert!(
            rebuilt.special.add_bos,
            "llama.cpp adds BOS for sentencepiece by default"
        );
        let tokenizer = load(&rebuilt);
        let id = |t: &str| tokenizer.token_to_id(t).unwrap();
        let ids = tokenizer.encode("ab", true).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![1, id("▁ab")]);
        // "é" is not a piece: its two UTF-8 bytes come out as byte tokens.
        let ids = tokenizer.encode("é", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![id("▁"), 3 + 0xC3, 3 + 0xA9]);
        let ids = tokenizer
            .encode("ab</s>a", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, vec![id("▁ab"), 2, id("▁a")]);
        assert_eq!(
            tokenizer
                .decode(&[1, id("▁ab"), 3 + 0xC3, 3 + 0xA9], true)
                .unwrap(),
            "abé"
        );
    }

    #[test]
    fn add_bos_and_add_eos_follow_the_metadata() {
        let mut metadata = spm_metadata();
        metadata.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
        metadata.insert("tokenizer.ggml.add_eos_token".into(), Value::Bool(true));
        let tokenizer = load(&GgufTokenizer::from_metadata(&metadata).unwrap());
        let ids = tokenizer.encode("ab", true).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![tokenizer.token_to_id("▁ab").unwrap(), 2]);
    }

    #[test]
    fn unknown_models_and_pre_tokenizers_are_named() {
        let mut metadata = spm_metadata();
        metadata.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
        let err = GgufTokenizer::from_metadata(&metadata).unwrap_err();
        assert!(
            matches!(err, TokenizerError::UnsupportedModel(ref m) if m == "bert"),
            "{err}"
        );

        metadata.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        metadata.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("nonesuch".into()),
        );
        metadata.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(vec![])),
        );
        let err = GgufTokenizer::from_metadata(&metadata).unwrap_err();
        assert!(err.to_string().contains("nonesuch"), "{err}");

        let mut metadata = spm_metadata();
        metadata.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(10_000));
        let err = GgufTokenizer::from_metadata(&metadata).unwrap_err();
        assert!(err.to_string().contains("eos_token_id"), "{err}");
        metadata.remove("tokenizer.ggml.tokens");
        assert!(matches!(
            GgufTokenizer::from_metadata(&metadata),
            Err(TokenizerError::Missing("tokenizer.ggml.tokens"))
        ));
    }

    #[test]
    fn merges_split_at_the_first_inner_space() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("  x"), Some((" ".into(), "x".into())));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge("a "), None);
        assert_eq!(split_merge(""), None);
    }
}
