//! Text ↔ token ids, and the streaming of generated ids back to text.
//!
//! [`Tokenizer`] wraps the HuggingFace `tokenizers` crate, so a bundle's `tokenizer.json` is read
//! by the same code that wrote it upstream (sentencepiece-style byte-fallback BPE for Mistral,
//! GPT-2 byte-level BPE for SmolLM2, …), rather than by a re-implementation per model family.
//!
//! Generation produces one id at a time, but one id is not one piece of text: a character may
//! be spread over several byte tokens (`<0xF0><0x9F><0xA6><0x99>` is 🦙), and a decoder may treat
//! the first token of a text differently (sentencepiece drops its leading space). [`Detokenizer`]
//! turns ids into text pieces that are always whole UTF-8 characters and that add up exactly to
//! the decode of all the ids at once. [`StopMatcher`] holds back text that might be the start of
//! a stop string, so a client never sees part of a stop string. [`TextStream`] chains the two.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the `tokenizers` crate reports; it has no error type of its own.
type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Errors of loading a tokenizer and of converting between text and ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {}: {source}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    #[error("cannot parse tokenizer JSON: {0}")]
    Parse(#[source] Cause),
    #[error("cannot encode text: {0}")]
    Encode(#[source] Cause),
    #[error("cannot decode token ids: {0}")]
    Decode(#[source] Cause),
    #[error("token id {id} is outside the vocabulary ({vocab_size} tokens)")]
    UnknownId { id: u32, vocab_size: usize },
}

/// A model's tokenizer, cheap to clone and share between threads.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    vocab_size: usize,
    special_ids: Arc<[u32]>,
    max_token_bytes: Option<usize>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("special_ids", &self.special_ids)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads a HuggingFace `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|source| TokenizerError::Load {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self::wrap(inner))
    }

    /// Parses the contents of a HuggingFace `tokenizer.json`.
    pub fn from_bytes(json: &[u8]) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(TokenizerError::Parse)?;
        Ok(Self::wrap(inner))
    }

    fn wrap(mut inner: tokenizers::Tokenizer) -> Self {
        // The model's cache keeps every distinct piece under 256 bytes it has merged, up to
        // 10 000 of them, for the life of the tokenizer. Without a pre-tokenizer (Llama 2,
        // Mistral) a piece is a whole prompt, so a daemon kept about 2 KB per short request
        // it had served, 20 MB and more after thousands, for hits that never come. Without
        // it, encoding takes about 1 µs a token more (SmolLM2, Mistral), far below a token's
        // prefill.
        let mut model = inner.get_model().clone();
        model.resize_cache(0);
        inner.with_model(model);
        let mut special_ids: Vec<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, token)| token.special)
            .map(|(&id, _)| id)
            .collect();
        special_ids.sort_unstable();
        let max_token_bytes = json(&inner).ok().and_then(|json| max_token_bytes(&json));
        Self {
            vocab_size: inner.get_vocab_size(true),
            special_ids: special_ids.into(),
            max_token_bytes,
            inner: Arc::new(inner),
        }
    }

    /// The fewest tokens that `bytes` bytes of text can encode to, when this tokenizer allows
    /// such a bound (see [`max_token_bytes`]): a text too long for the context can then be
    /// refused without tokenizing it. `None` when its pipeline could shrink or drop text.
    pub fn min_tokens(&self, bytes: usize) -> Option<MinTokens> {
        self.max_token_bytes.map(|max_token_bytes| MinTokens {
            tokens: bytes.div_ceil(max_token_bytes),
            max_token_bytes,
        })
    }

    /// The tokenizer serialized as `tokenizer.json`, for readers of the format such as the
    /// structured-output trie ([`crate::constraint`]).
    pub fn to_json(&self) -> Result<serde_json::Value, TokenizerError> {
        json(&self.inner)
    }

    /// Number of ids, added tokens included: every valid id is below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Ids of `text`. Special tokens written in the text (`<s>`, `<|im_end|>`) become their ids;
    /// `add_special_tokens` also applies the tokenizer's template, e.g. a leading BOS.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, all at once. Ids outside the vocabulary are an error rather than being
    /// dropped silently, since they may come from a client.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size,
            });
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::Decode)
    }

    /// Id of a token written as it appears in the vocabulary (`"<s>"`, `"▁Paris"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary entry of an id, as stored (`"▁Paris"`, `"<0xE2>"`), not decoded text.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids of the added tokens marked special (BOS, EOS, chat markers), in increasing order.
    pub fn special_token_ids(&self) -> &[u32] {
        &self.special_ids
    }

    /// Whether `id` is a special token, which streams do not show as text.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.binary_search(&id).is_ok()
    }
}

fn json(inner: &tokenizers::Tokenizer) -> Result<serde_json::Value, TokenizerError> {
    let text = inner.to_string(false).map_err(TokenizerError::Parse)?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Parse(e.into()))
}

/// A lower bound on a text's token count, from its length alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinTokens {
    pub tokens: usize,
    /// No token of the vocabulary stands for more bytes of input text than this.
    pub max_token_bytes: usize,
}

/// The most bytes of input text one token can stand for, read from the serialized
/// `tokenizer.json`: the longest vocabulary entry or added token, in UTF-8 bytes.
///
/// That is a bound only where every step of the pipeline keeps each input byte in exactly one
/// token and never writes an entry shorter than the input it covers: byte-level entries spell
/// each input byte as one character (one to two bytes), sentencepiece entries spell a space as
/// `▁` (three bytes) and a fallback byte as `<0xNN>` (six). Normalizers and pre-tokenizers that
/// can shrink or drop text (Unicode normalization, stripping, splits that remove their
/// delimiter), an unknown token fused over a run of unknown characters and truncation have no
/// such bound: `None` then, and prompts are tokenized whole.
fn max_token_bytes(json: &serde_json::Value) -> Option<usize> {
    use serde_json::Value;
    fn kind(step: &Value) -> &str {
        step.get("type").and_then(Value::as_str).unwrap_or("")
    }
    fn keeps_text(step: &Value, list: &str) -> bool {
        match kind(step) {
            "Sequence" => step
                .get(list)
                .and_then(Value::as_array)
                .is_some_and(|steps| steps.iter().all(|s| keeps_text(s, list))),
            "Prepend" | "ByteLevel" | "Metaspace" | "Digits" => true,
            "Replace" => {
                let pattern = step.pointer("/pattern/String").and_then(Value::as_str);
                let content = step.get("content").and_then(Value::as_str);
                matches!((pattern, content), (Some(p), Some(c)) if c.len() >= p.len())
            }
            "Split" | "Punctuation" => {
                step.get("behavior").and_then(Value::as_str) != Some("Removed")
            }
            _ => false,
        }
    }
    if json.get("truncation").is_some_and(|t| !t.is_null()) {
        return None;
    }
    let normalizer = json.get("normalizer")?;
    if !normalizer.is_null() && !keeps_text(normalizer, "normalizers") {
        return None;
    }
    let pre_tokenizer = json.get("pre_tokenizer")?;
    if !pre_tokenizer.is_null() && !keeps_text(pre_tokenizer, "pretokenizers") {
        return None;
    }
    let model = json.get("model")?;
    let flag = |key: &str| model.get(key).and_then(Value::as_bool).unwrap_or(false);
    let fused_unknown = model.get("unk_token").is_some_and(|unk| !unk.is_null())
        && flag("fuse_unk")
        && !flag("byte_fallback");
    if kind(model) != "BPE" || fused_unknown {
        return None;
    }
    let vocabulary = model.get("vocab")?.as_object()?.keys().map(String::len);
    let added = json
        .get("added_tokens")?
        .as_array()?
        .iter()
        .filter_map(|token| token.get("content").and_then(Value::as_str))
        .map(str::len);
    vocabulary.chain(added).max().filter(|&longest| longest > 0)
}

/// How many prompt tokens [`Detokenizer::with_context`] keeps: enough for a decoder to see
/// that the first generated token does not start the text.
const CONTEXT_TOKENS: usize = 4;

/// Turns generated ids, one at a time, into text pieces of whole UTF-8 characters.
///
/// Each step decodes a short window of recent ids and emits what the newest ids added to the
/// text of the older ones, the way the text-generation servers of HuggingFace do it; text that
/// ends in an incomplete character (decoded as U+FFFD) is held back until the next ids complete
/// it or [`finish`](Self::finish) is called. The pieces concatenated equal the decode of all the
/// ids at once. One exception is a byte sequence that is not UTF-8 at all, which only a sampled
/// (never an encoded) sequence can hold: the stream may then show a different number of U+FFFD
/// than the full decode, never a broken character. Special tokens are skipped.
#[derive(Debug, Clone)]
pub struct Detokenizer {
    tokenizer: Tokenizer,
    ids: Vec<u32>,
    /// Start of the window: the ids of the last emitted piece, decoded again for context.
    prefix_offset: usize,
    /// Ids before this one have been emitted.
    read_offset: usize,
}

impl Detokenizer {
    /// A stream whose first id starts the text.
    pub fn new(tokenizer: &Tokenizer) -> Self {
        Self::with_context(tokenizer, &[])
    }

    /// A stream that continues `context` (the prompt), whose text is not emitted. A sentencepiece
    /// decoder strips the space of the first token of a text, so without the context a
    /// completion of "The capital of France is" would start "Paris" instead of " Paris".
    pub fn with_context(tokenizer: &Tokenizer, context: &[u32]) -> Self {
        let tail = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            tokenizer: tokenizer.clone(),
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
        }
    }

    /// Adds one id; returns the text it completes, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = self.decode(self.prefix_offset..self.read_offset)?;
        let text = self.decode(self.prefix_offset..self.ids.len())?;
        if text.len() <= prefix.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        let piece = text[common_prefix_len(&prefix, &text)..].to_owned();
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(piece)
    }

    /// Text still held back at the end of the generation (an incomplete character shows as
    /// U+FFFD, as in the full decode).
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let prefix = self.decode(self.prefix_offset..self.read_offset)?;
        let text = self.decode(self.prefix_offset..self.ids.len())?;
        let piece = text[common_prefix_len(&prefix, &text)..].to_owned();
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(piece)
    }

    fn decode(&self, range: std::ops::Range<usize>) -> Result<String, TokenizerError> {
        self.tokenizer.decode(&self.ids[range], true)
    }
}

/// Length of the longest common prefix of `a` and `b` that ends on a character boundary.
/// Normally all of `a`; shorter only if a decoder rewrote text it had already produced.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or_else(|| a.len().min(b.len()), |((index, _), _)| index)
}

/// Text released by a [`StopMatcher`] or a [`TextStream`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextPiece {
    /// Text that is safe to show: whole characters, no part of a stop string.
    pub text: String,
    /// A stop string matched: `text` ends right before it, and generation should end with
    /// reason `stop`.
    pub stopped: bool,
}

/// Finds stop strings in streamed text, holding back what could still become one.
///
/// Text is released as soon as no stop string can start in it: a piece ending in `"\nUs"` with
/// a stop string `"\nUser:"` holds `"\nUs"` back until the next piece shows whether it is the
/// stop string or ordinary text. Stop strings are matched in the decoded text, so they match
/// whichever way the model spelled them in tokens.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored: they would stop every generation before its first token.
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        Self {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|stop: &String| !stop.is_empty())
                .collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds streamed text; returns what can be shown now. After a stop, everything is dropped.
    pub fn push(&mut self, text: &str) -> TextPiece {
        if self.stopped {
            return TextPiece {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(start) = earliest {
            self.held.truncate(start);
            self.stopped = true;
            return TextPiece {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep_from = self.partial_stop_start();
        let kept = self.held.split_off(keep_from);
        TextPiece {
            text: std::mem::replace(&mut self.held, kept),
            stopped: false,
        }
    }

    /// Text held back when the generation ends for another reason: it was not a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Start of the longest end of the held text that begins some stop string.
    fn partial_stop_start(&self) -> usize {
        self.held
            .char_indices()
            .map(|(index, _)| index)
            .find(|&index| {
                let tail = &self.held[index..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

/// Generated ids in, text to show out: a [`Detokenizer`] followed by a [`StopMatcher`].
#[derive(Debug, Clone)]
pub struct TextStream {
    detokenizer: Detokenizer,
    stops: StopMatcher,
}

impl TextStream {
    /// A stream continuing `context` (the prompt ids, whose text is not repeated) that ends at
    /// the first of `stops`.
    pub fn new<S: Into<String>>(
        tokenizer: &Tokenizer,
        context: &[u32],
        stops: impl IntoIterator<Item = S>,
    ) -> Self {
        Self {
            detokenizer: Detokenizer::with_context(tokenizer, context),
            stops: StopMatcher::new(stops),
        }
    }

    /// Adds one generated id; returns the text it releases, and whether a stop string matched.
    pub fn push(&mut self, id: u32) -> Result<TextPiece, TokenizerError> {
        let text = self.detokenizer.push(id)?;
        Ok(self.stops.push(&text))
    }

    /// Text still held back when generation ends without a stop string (length, EOS, cancel).
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let tail = self.detokenizer.finish()?;
        let mut released = self.stops.push(&tail);
        if !released.stopped {
            released.text.push_str(&self.stops.finish());
        }
        Ok(released.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/mistral-7b-v0.1"
    );
    /// Mistral's vocabulary starts with <unk>, <s>, </s>, then the 256 byte tokens <0x00>…<0xFF>.
    const FIRST_BYTE_ID: u32 = 3;
    const BOS: u32 = 1;

    fn mistral() -> Tokenizer {
        Tokenizer::from_file(&Path::new(FIXTURE).join("tokenizer.json"))
            .expect("Mistral tokenizer fixture loads")
    }

    struct Case {
        text: String,
        ids: Vec<u32>,
    }

    /// sentencepiece's own ids for the corpus of `convert.py`.
    fn reference_cases() -> Vec<Case> {
        let json = std::fs::read_to_string(Path::new(FIXTURE).join("expected_ids.json"))
            .expect("fixture exists");
        let value: serde_json::Value = serde_json::from_str(&json).expect("fixture is JSON");
        value["cases"]
            .as_array()
            .expect("cases array")
            .iter()
            .map(|case| Case {
                text: case["text"].as_str().expect("text").to_owned(),
                ids: serde_json::from_value(case["ids"].clone()).expect("ids"),
            })
            .collect()
    }

    fn has_special_token(text: &str) -> bool {
        ["<s>", "</s>", "<unk>"]
            .iter()
            .any(|special| text.contains(special))
    }

    fn stream_all(detokenizer: &mut Detokenizer, ids: &[u32]) -> Vec<String> {
        let mut pieces: Vec<String> = ids
            .iter()
            .map(|&id| detokenizer.push(id).expect("decodes"))
            .collect();
        pieces.push(detokenizer.finish().expect("decodes"));
        pieces
    }

    #[test]
    fn encoding_matches_sentencepiece_on_the_whole_corpus() {
        let tokenizer = mistral();
        let cases = reference_cases();
        assert!(cases.len() >= 30, "the corpus is varied");
        for case in &cases {
            assert_eq!(
                tokenizer.encode(&case.text, false).unwrap(),
                case.ids,
                "{:?}",
                case.text
            );
            let with_bos = tokenizer.encode(&case.text, true).unwrap();
            assert_eq!(with_bos[0], BOS, "{:?}", case.text);
            assert_eq!(with_bos[1..], case.ids, "{:?}", case.text);
        }
    }

    #[test]
    fn length_bound_is_below_every_real_count() {
        let tokenizer = mistral();
        let bound = tokenizer
            .min_tokens(0)
            .expect("Mistral's pipeline has a bound");
        assert_eq!(bound.tokens, 0);
        let mut texts: Vec<String> = reference_cases().into_iter().map(|c| c.text).collect();
        texts.push(" ".repeat(1000));
        texts.push("🦙".repeat(300));
        texts.push("<s></s><unk>".repeat(50));
        for text in texts {
            let count = tokenizer.encode(&text, false).unwrap().len();
            let bound = tokenizer.min_tokens(text.len()).unwrap().tokens;
            assert!(bound <= count, "{text:?}: {count} tokens, bound {bound}");
        }
    }

    #[test]
    fn no_length_bound_where_the_normalizer_can_drop_text() {
        let json = std::fs::read_to_string(Path::new(FIXTURE).join("tokenizer.json")).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["normalizer"] = serde_json::json!({"type": "NFKC"});
        assert_eq!(max_token_bytes(&value), None);
    }

    #[test]
    fn decoding_round_trips_text_without_special_tokens() {
        let tokenizer = mistral();
        for case in reference_cases()
            .iter()
            .filter(|case| !has_special_token(&case.text))
        {
            assert_eq!(tokenizer.decode(&case.ids, false).unwrap(), case.text);
        }
    }

    #[test]
    fn special_tokens_are_known_by_id_and_by_text() {
        let tokenizer = mistral();
        assert_eq!(tokenizer.vocab_size(), 32000);
        assert_eq!(tokenizer.special_token_ids(), &[0, 1, 2]);
        assert_eq!(tokenizer.token_to_id("<s>"), Some(1));
        assert_eq!(tokenizer.token_to_id("</s>"), Some(2));
        assert_eq!(tokenizer.id_to_token(2).as_deref(), Some("</s>"));
        assert_eq!(
            tokenizer.id_to_token(FIRST_BYTE_ID + 0xE2).as_deref(),
            Some("<0xE2>")
        );
        assert!(tokenizer.is_special(1));
        assert!(!tokenizer.is_special(FIRST_BYTE_ID));
        assert_eq!(tokenizer.encode("<s>", false).unwrap(), vec![1]);
        assert_eq!(tokenizer.decode(&[1, 22557, 2], true).unwrap(), "Hello");
    }

    #[test]
    fn out_of_vocabulary_ids_are_an_error_naming_the_id() {
        let error = mistral().decode(&[22557, 32000], false).unwrap_err();
        assert!(matches!(
            error,
            TokenizerError::UnknownId {
                id: 32000,
                vocab_size: 32000
            }
        ));
        assert!(error.to_string().contains("32000"));
    }

    #[test]
    fn load_errors_name_the_file() {
        let missing = Path::new(FIXTURE).join("no-such-tokenizer.json");
        let error = Tokenizer::from_file(&missing).unwrap_err();
        assert!(
            error.to_string().contains("no-such-tokenizer.json"),
            "{error}"
        );
        assert!(matches!(
            Tokenizer::from_bytes(b"{\"model\": 3}"),
            Err(TokenizerError::Parse(_))
        ));
    }

    #[test]
    fn stream_of_every_corpus_line_adds_up_to_the_full_decode() {
        let tokenizer = mistral();
        for case in reference_cases() {
            let pieces = stream_all(&mut Detokenizer::new(&tokenizer), &case.ids);
            assert_eq!(
                pieces.concat(),
                tokenizer.decode(&case.ids, true).unwrap(),
                "{:?}",
                case.text
            );
            assert!(
                pieces
                    .iter()
                    .all(|piece| !piece.contains(char::REPLACEMENT_CHARACTER)),
                "no broken character in {pieces:?}"
            );
        }
    }

    #[test]
    fn emoji_split_over_byte_tokens_is_held_until_complete() {
        let tokenizer = mistral();
        let ids = tokenizer.encode("🦙!", false).unwrap();
        let llama_bytes: Vec<u32> = "🦙"
            .bytes()
            .map(|byte| FIRST_BYTE_ID + u32::from(byte))
            .collect();
        let start = ids
            .windows(4)
            .position(|window| window == llama_bytes)
            .expect("🦙 is not in the vocabulary: sentencepiece spells it as four byte tokens");
        let mut detokenizer = Detokenizer::new(&tokenizer);
        let pieces: Vec<String> = ids
            .iter()
            .map(|&id| detokenizer.push(id).unwrap())
            .collect();
        for held in &pieces[start..start + 3] {
            assert_eq!(held, "", "an incomplete character is held back");
        }
        assert!(pieces[start + 3].ends_with('🦙'), "{pieces:?}");
        assert_eq!(pieces.concat() + &detokenizer.finish().unwrap(), "🦙!");
    }

    #[test]
    fn accents_and_cjk_stream_as_whole_characters() {
        let tokenizer = mistral();
        // 龘 is rare enough to be byte tokens; the others are single pieces.
        let text = "Déjà vu, naïveté — 東京 龘 한국";
        let ids = tokenizer.encode(text, false).unwrap();
        assert!(
            ids.iter()
                .any(|&id| (FIRST_BYTE_ID..FIRST_BYTE_ID + 256).contains(&id))
        );
        let pieces = stream_all(&mut Detokenizer::new(&tokenizer), &ids);
        assert_eq!(pieces.concat(), text);
        assert!(
            pieces
                .iter()
                .all(|piece| !piece.contains(char::REPLACEMENT_CHARACTER))
        );
    }

    #[test]
    fn first_generated_token_keeps_its_space_after_a_prompt() {
        let tokenizer = mistral();
        let prompt = tokenizer.encode("The capital of France is", true).unwrap();
        let whole = tokenizer
            .encode("The capital of France is Paris.", true)
            .unwrap();
        assert_eq!(
            whole[..prompt.len()],
            prompt[..],
            "the prompt's tokens do not change"
        );
        let generated = &whole[prompt.len()..];
        let continued = stream_all(
            &mut Detokenizer::with_context(&tokenizer, &prompt),
            generated,
        );
        assert_eq!(continued.concat(), " Paris.");
        // Alone, the first token starts the text, and a sentencepiece decoder drops its space.
        assert_eq!(
            stream_all(&mut Detokenizer::new(&tokenizer), generated).concat(),
            "Paris."
        );
    }

    #[test]
    fn random_valid_streams_add_up_to_the_full_decode() {
        let tokenizer = mistral();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let chars = ['é', '€', '🦙', '龘', 'ß', '\n'];
        for _ in 0..40 {
            let mut ids = Vec::new();
            for _ in 0..rng.random_range(1..60) {
                if rng.random_bool(0.2) {
                    let char = chars[rng.random_range(0..chars.len())];
                    let mut buffer = [0; 4];
                    ids.extend(
                        char.encode_utf8(&mut buffer)
                            .bytes()
                            .map(|byte| FIRST_BYTE_ID + u32::from(byte)),
                    );
                } else {
                    ids.push(rng.random_range(FIRST_BYTE_ID + 256..32000));
                }
            }
            let context = tokenizer.encode("Once upon a time", true).unwrap();
            let pieces = stream_all(&mut Detokenizer::with_context(&tokenizer, &context), &ids);
            let all: Vec<u32> = context.iter().chain(&ids).copied().collect();
            let full = tokenizer.decode(&all, true).unwrap();
            let prompt_text = tokenizer.decode(&context, true).unwrap();
            assert_eq!(format!("{prompt_text}{}", pieces.concat()), full, "{ids:?}");
        }
    }

    #[test]
    fn invalid_bytes_show_as_replacement_characters_not_broken_text() {
        let tokenizer = mistral();
        let hello = tokenizer.encode("hello", false).unwrap();
        let mut ids = vec![FIRST_BYTE_ID + 0xFF, FIRST_BYTE_ID + 0xE2];
        ids.extend(&hello);
        ids.push(FIRST_BYTE_ID + 0xF0);
        let text = stream_all(&mut Detokenizer::new(&tokenizer), &ids).concat();
        assert!(text.starts_with(char::REPLACEMENT_CHARACTER), "{text:?}");
        assert!(text.contains("hello"), "{text:?}");
        assert!(
            text.ends_with(char::REPLACEMENT_CHARACTER),
            "the unfinished byte is flushed at the end: {text:?}"
        );
    }

    #[test]
    fn stop_matcher_holds_back_a_possible_stop_until_disambiguated() {
        let mut stops = StopMatcher::new(["\nUser:"]);
        assert_eq!(stops.push("Hello\nUs").text, "Hello");
        let piece = stops.push("ually");
        assert_eq!(piece.text, "\nUsually");
        assert!(!piece.stopped);
        assert_eq!(stops.push(" fine.\nU").text, " fine.");
        let piece = stops.push("ser: hi");
        assert_eq!(
            piece,
            TextPiece {
                text: String::new(),
                stopped: true
            }
        );
        assert!(stops.push("more").stopped, "nothing after a stop");
        assert_eq!(stops.push("more").text, "");
    }

    #[test]
    fn stop_matcher_releases_the_text_before_the_earliest_stop() {
        let mut stops = StopMatcher::new(["END", "", "ND", "。"]);
        let piece = stops.push("the eND of a sENDing。");
        assert_eq!(piece.text, "the e", "ND in eND precedes END in sENDing");
        assert!(piece.stopped);

        let mut stops = StopMatcher::new(["。停"]);
        assert_eq!(stops.push("東京。").text, "東京");
        assert_eq!(stops.push("x").text, "。x");
        assert_eq!(stops.push("。").text, "");
        assert_eq!(
            stops.finish(),
            "。",
            "held text is released when generation ends otherwise"
        );
    }

    #[test]
    fn text_stream_stops_on_a_stop_string_spread_over_tokens() {
        let tokenizer = mistral();
        let prompt = tokenizer.encode("Q: 2+2?\nA:", true).unwrap();
        let answer = tokenizer
            .encode("Q: 2+2?\nA: 4 🦙\nQ: and 3+3?", true)
            .unwrap();
        let generated = &answer[prompt.len()..];
        let mut stream = TextStream::new(&tokenizer, &prompt, ["\nQ:"]);
        let mut shown = String::new();
        let mut stopped_at = None;
        for (index, &id) in generated.iter().enumerate() {
            let piece = stream.push(id).unwrap();
            shown.push_str(&piece.text);
            if piece.stopped {
                stopped_at = Some(index);
                break;
            }
        }
        assert!(stopped_at.is_some(), "the stop string matched");
        assert_eq!(shown + &stream.finish().unwrap(), " 4 🦙");
    }

    #[test]
    fn text_stream_without_stop_shows_everything() {
        let tokenizer = mistral();
        let ids = tokenizer.encode("Line one\nLine two 🦙", false).unwrap();
        let mut stream = TextStream::new(&tokenizer, &[], ["never"]);
        let mut shown = String::new();
        for &id in &ids {
            let piece = stream.push(id).unwrap();
            assert!(!piece.stopped);
            shown.push_str(&piece.text);
        }
        assert_eq!(shown + &stream.finish().unwrap(), "Line one\nLine two 🦙");
    }
}
