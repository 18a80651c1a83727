//! Request preparation: what a caller sent (a prompt, a chat or token ids, and options) becomes
//! a [`GenerateRequest`] the engine can run, or is refused with a reason the caller can act on.
//!
//! This is the one place where options are defaulted and range-checked, the chat template is
//! applied and the prompt is checked against the context, for D-Bus and `marengod generate`
//! alike; it needs only the [`TextSide`], never the weights. A prompt that cannot fit is refused
//! from its length when the tokenizer gives a bound ([`crate::tokenizer::MinTokens`]), before it
//! is tokenized: tokenizing megabytes costs seconds and gigabytes, and any local client can send
//! them.

use crate::chat::{ChatError, Message};
use crate::constraint::{Constraint, ConstraintError, ConstraintSpec};
use crate::sampler::{SamplingError, SamplingParams};
use crate::text::TextSide;
use crate::tokenizer::{MinTokens, TokenizerError};

/// Prompts at least this long leave freed buffers worth handing back to the system.
const LARGE_PROMPT_BYTES: usize = 1 << 20;

/// What to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Text, tokenized with the tokenizer's special tokens (a leading BOS).
    Text(String),
    /// A conversation, rendered with the model's chat template, which writes its own special
    /// tokens.
    Chat(Vec<Message>),
    /// Token ids, fed as they are.
    Ids(Vec<u32>),
}

/// The options of one request, as sent; `None` means the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOptions {
    /// The model's name; `None` is the daemon's default model. Chosen before preparation,
    /// which happens on that model's text side.
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_k: Option<u32>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Structured output: at most one schema, regex or grammar.
    pub constraint: Option<ConstraintSpec>,
}

/// A request that fits: its prompt leaves room for at least one new token and its sampling
/// parameters are in range. Only [`TextSide::prepare`] makes one.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    prompt: Vec<u32>,
    sampling: SamplingParams,
    max_tokens: usize,
    stop: Vec<String>,
    /// Compiled, at the start of the output.
    constraint: Option<Constraint>,
}

impl GenerateRequest {
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn stop(&self) -> &[String] {
        &self.stop
    }

    pub fn constraint(&self) -> Option<&Constraint> {
        self.constraint.as_ref()
    }
}

/// How long a refused prompt is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptLength {
    /// Counted by tokenizing it.
    Tokens(usize),
    /// Bounded from its length in bytes, without tokenizing it.
    AtLeast { bytes: usize, bound: MinTokens },
}

impl std::fmt::Display for PromptLength {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PromptLength::Tokens(tokens) => write!(f, "{tokens} tokens"),
            PromptLength::AtLeast { bytes, bound } => write!(
                f,
                "{bytes} bytes, so at least {} tokens (no token of this model stands for more \
                 than {} bytes)",
                bound.tokens, bound.max_token_bytes
            ),
        }
    }
}

/// Why a request cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("Chat needs at least one message")]
    NoMessages,
    #[error(
        "this model's bundle has no chat template (marengo-export convert --chat-template FILE \
         gives it one)"
    )]
    NoChatTemplate,
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("cannot tokenize the {what}: {source}")]
    Tokenize {
        what: &'static str,
        source: TokenizerError,
    },
    #[error(
        "the prompt is {length}; the model's context holds {context_length}, and one more is \
         needed to generate"
    )]
    ContextOverflow {
        length: PromptLength,
        context_length: usize,
    },
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
}

impl TextSide {
    /// The prompt's tokens, as a generation feeds them to the model (special tokens such as
    /// BOS included).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.tokenizer().encode(text, true)
    }

    /// Checks `options` and `prompt` and makes the request. `default_max_tokens` applies when
    /// the options set none.
    pub fn prepare(
        &self,
        prompt: Prompt,
        options: RequestOptions,
        default_max_tokens: u32,
    ) -> Result<GenerateRequest, RequestError> {
        let bytes = match &prompt {
            Prompt::Text(text) => text.len(),
            Prompt::Chat(messages) => messages.iter().map(|m| m.content.len()).sum(),
            Prompt::Ids(_) => 0,
        };
        let prepared = self.prepare_fitting(prompt, options, default_max_tokens);
        // The text, its rendering and its tokens are freed by now.
        if bytes >= LARGE_PROMPT_BYTES {
            crate::memory::release_free_heap();
        }
        prepared
    }

    fn prepare_fitting(
        &self,
        prompt: Prompt,
        options: RequestOptions,
        default_max_tokens: u32,
    ) -> Result<GenerateRequest, RequestError> {
        let sampling = sampling(&options)?;
        // Before the prompt is tokenized: a broken schema is refused whatever the prompt.
        let constraint = options
            .constraint
            .as_ref()
            .map(|spec| self.compile(spec))
            .transpose()?;
        let tokens = match prompt {
            Prompt::Ids(ids) => ids,
            Prompt::Text(text) => self.encode_fitting(&text, true, "prompt")?,
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(RequestError::NoMessages);
                }
                let template = self.chat_template().ok_or(RequestError::NoChatTemplate)?;
                let text = template.render(&messages, true)?;
                self.encode_fitting(&text, false, "chat")?
            }
        };
        let context_length = self.context_length();
        if tokens.len() >= context_length {
            return Err(RequestError::ContextOverflow {
                length: PromptLength::Tokens(tokens.len()),
                context_length,
            });
        }
        Ok(GenerateRequest {
            prompt: tokens,
            sampling,
            max_tokens: options.max_tokens.unwrap_or(default_max_tokens) as usize,
            stop: options.stop,
            constraint,
        })
    }

    /// Tokenizes `text` unless its length alone shows that it cannot fit the context.
    fn encode_fitting(
        &self,
        text: &str,
        add_special_tokens: bool,
        what: &'static str,
    ) -> Result<Vec<u32>, RequestError> {
        let context_length = self.context_length();
        if let Some(bound) = self.tokenizer().min_tokens(text.len())
            && bound.tokens >= context_length
        {
            return Err(RequestError::ContextOverflow {
                length: PromptLength::AtLeast {
                    bytes: text.len(),
                    bound,
                },
                context_length,
            });
        }
        self.tokenizer()
            .encode(text, add_special_tokens)
            .map_err(|source| RequestError::Tokenize { what, source })
    }
}

/// The sampling parameters of `options`, defaults filled in and ranges checked.
pub(crate) fn sampling(options: &RequestOptions) -> Result<SamplingParams, SamplingError> {
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: options
            .temperature
            .map_or(defaults.temperature, |t| t as f32),
        top_k: options.top_k.unwrap_or(defaults.top_k),
        top_p: options.top_p.map_or(defaults.top_p, |p| p as f32),
        min_p: options.min_p.map_or(defaults.min_p, |p| p as f32),
        repeat_penalty: options
            .repeat_penalty
            .map_or(defaults.repeat_penalty, |r| r as f32),
        seed: options.seed.or(defaults.seed),
        ..defaults
    };
    sampling.validate()?;
    Ok(sampling)
}
