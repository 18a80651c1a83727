//! Structured output: a JSON schema, a regular expression or a Lark grammar that the generated
//! text must match, enforced token by token with llguidance.
//!
//! A constraint is compiled while its request is prepared, so that one that does not compile is
//! refused before anything is queued (llama.cpp falls back to free text there, and an app that
//! asked for JSON then parses prose). During generation it removes from the logits every token
//! that cannot continue a match, before the sampler's own steps, so every sampler setting still
//! applies to what is left; the end-of-sequence token is among the allowed ones only when the
//! text so far is a complete match.
//!
//! llguidance works on token *bytes*: its trie is built from the bundle's `tokenizer.json` by
//! llguidance's own reader, which knows both spellings our bundles use (GPT-2 byte-level BPE,
//! sentencepiece with `<0xNN>` byte fallback and `▁` for a space). `toktrie_hf_tokenizers`
//! would do the same through the `tokenizers` crate, but it links `tokenizers` 0.21 beside our
//! 0.22: a second copy of that crate in every build. The trie and llguidance's tables cost a
//! fraction of a second and some megabytes, so a [`Compiler`] is made on the first constrained
//! request, not when the text side loads.

use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::tokenizer::Tokenizer;

/// What the output must match, as the request's option gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON schema, as JSON text.
    JsonSchema(String),
    /// A regular expression the whole output matches.
    Regex(String),
    /// A grammar in llguidance's Lark syntax.
    Grammar(String),
}

impl ConstraintSpec {
    /// The name of the option that carries it.
    pub fn option(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonSchema(_) => "json_schema",
            ConstraintSpec::Regex(_) => "regex",
            ConstraintSpec::Grammar(_) => "grammar",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConstraintError {
    /// The caller's schema, regex or grammar; `option` is its option's name.
    #[error("option `{option}` does not compile: {message}")]
    Invalid {
        option: &'static str,
        message: String,
    },
    #[error("this model's tokenizer cannot be used for structured output: {0}")]
    Vocabulary(String),
    /// The constraint could not follow the generation (a parser limit reached mid-way).
    #[error("the output constraint failed: {0}")]
    Failed(String),
}

/// Compiles constraints against one tokenizer's vocabulary.
pub struct Compiler {
    factory: ParserFactory,
}

impl std::fmt::Debug for Compiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiler").finish_non_exhaustive()
    }
}

impl Compiler {
    /// A compiler for `tokenizer`, whose model has `vocab_size` logits (more than the
    /// tokenizer's ids when the embedding is padded) and ends a text with `eos`.
    pub fn new(
        tokenizer: &Tokenizer,
        vocab_size: usize,
        eos: u32,
    ) -> Result<Self, ConstraintError> {
        let json = tokenizer
            .to_json()
            .map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        // Padding ids have no bytes: the trie never offers them.
        words.resize(words.len().max(vocab_size), Vec::new());
        let info = TokRxInfo {
            tok_bos: None,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
            ..TokRxInfo::new(words.len() as u32, eos)
        };
        // Greedy tokenizing over the trie is only used for text the grammar forces, which a
        // generation never feeds back to the model: it samples every token.
        let env: TokEnv = std::sync::Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles `spec`; a refusal says what is wrong with it.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        let invalid = |message: String| ConstraintError::Invalid {
            option: spec.option(),
            message,
        };
        let grammar = match spec {
            ConstraintSpec::JsonSchema(text) => {
                let mut schema: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| invalid(format!("not JSON: {e}")))?;
                one_line(&mut schema);
                TopLevelGrammar::from_json_schema(schema)
            }
            ConstraintSpec::Regex(regex) => TopLevelGrammar::from_regex(regex),
            ConstraintSpec::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(message) = matcher.get_error() {
            return Err(invalid(message));
        }
        Ok(Constraint {
            matcher,
            spent: Duration::ZERO,
            steps: 0,
        })
    }
}

/// Asks for JSON on one line, with a space after `,` and `:`, unless the schema sets its own
/// layout (llguidance's `x-guidance` key). llguidance's default allows any run of whitespace
/// between tokens, and a sampled model can spend its whole `max_tokens` on newlines.
fn one_line(schema: &mut serde_json::Value) {
    if let Some(schema) = schema.as_object_mut()
        && !schema.contains_key("x-guidance")
    {
        schema.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
}

/// One request's constraint, at its position in the generated text.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    spent: Duration,
    steps: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("steps", &self.steps)
            .field("spent", &self.spent)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logit of every token that cannot come next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let start = Instant::now();
        let allowed = self.matcher.compute_mask().map_err(failed)?;
        for (id, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        self.spent += start.elapsed();
        self.steps += 1;
        Ok(())
    }

    /// Moves past `id`, which [`mask`](Self::mask) allowed; true when the text is complete
    /// and nothing may follow it.
    pub fn commit(&mut self, id: u32) -> Result<bool, ConstraintError> {
        let start = Instant::now();
        self.matcher.consume_token(id).map_err(failed)?;
        self.spent += start.elapsed();
        Ok(self.matcher.is_stopped())
    }

    /// The mean time spent per generated token, masking and committing.
    pub fn cost_per_token(&self) -> Duration {
        self.spent / self.steps.max(1) as u32
    }
}

fn failed(e: anyhow::Error) -> ConstraintError {
    ConstraintError::Failed(e.to_string())
}
