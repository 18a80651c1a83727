//! Turns what a D-Bus caller sent (a prompt or chat messages, and options) into the engine's
//! [`GenerateRequest`], refusing what the engine could not run: options out of range and
//! prompts that do not fit the context.

use crate::chat::{ChatError, Message};
use crate::engine::{Engine, GenerateRequest};
use crate::sampler::{SamplingError, SamplingParams};

use super::Llm1Error;
use super::options::{RequestOptions, invalid};

/// The prompt's tokens, as `Generate` feeds them to the model (special tokens such as BOS
/// included); `Tokenize` returns the same.
pub fn encode_prompt(engine: &Engine, prompt: &str) -> Result<Vec<u32>, Llm1Error> {
    engine
        .tokenizer()
        .encode(prompt, true)
        .map_err(|e| Llm1Error::Internal(format!("cannot tokenize the prompt: {e}")))
}

/// Renders `messages` (role, content) with the model's own chat template and tokenizes the
/// result. The template writes the special tokens itself, so none are added.
pub fn encode_chat(engine: &Engine, messages: &[(String, String)]) -> Result<Vec<u32>, Llm1Error> {
    if messages.is_empty() {
        return Err(Llm1Error::InvalidArgument(
            "Chat needs at least one message".into(),
        ));
    }
    let template = engine.chat_template().ok_or_else(|| {
        Llm1Error::InvalidArgument("this model's bundle has no chat template; use Generate".into())
    })?;
    let messages: Vec<Message> = messages
        .iter()
        .map(|(role, content)| Message::new(role, content))
        .collect();
    let text = template.render(&messages, true).map_err(|e| match e {
        ChatError::Rejected(_) => Llm1Error::InvalidArgument(e.to_string()),
        ChatError::Syntax(_) | ChatError::Render(_) => Llm1Error::Internal(e.to_string()),
    })?;
    engine
        .tokenizer()
        .encode(&text, false)
        .map_err(|e| Llm1Error::Internal(format!("cannot tokenize the chat: {e}")))
}

/// Builds the request, checking that the prompt leaves room for at least one new token.
pub fn build(
    engine: &Engine,
    prompt: Vec<u32>,
    options: RequestOptions,
    default_max_tokens: u32,
) -> Result<GenerateRequest, Llm1Error> {
    let context_length = engine.context_length();
    if prompt.len() >= context_length {
        return Err(Llm1Error::ContextOverflow(format!(
            "the prompt is {} tokens; the model's context holds {context_length}, and one \
             more is needed to generate",
            prompt.len()
        )));
    }
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
    sampling.validate().map_err(|e| match e {
        SamplingError::OutOfRange {
            key,
            value,
            allowed,
        } => invalid(key, &format!("is {value}, out of range: allowed {allowed}")),
        SamplingError::NoFiniteLogit { .. } => Llm1Error::Internal(e.to_string()),
    })?;
    Ok(GenerateRequest {
        prompt,
        sampling,
        max_tokens: options.max_tokens.unwrap_or(default_max_tokens) as usize,
        stop: options.stop,
    })
}
