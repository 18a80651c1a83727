//! What a D-Bus caller sent (a prompt or chat messages, and options) handed to the text side's
//! request preparation, and its refusals as `org.marengo.Llm1` errors.

use crate::chat::{ChatError, Message};
use crate::constraint::ConstraintError;
use crate::request::{GenerateRequest, Prompt, RequestError, RequestOptions};
use crate::sampler::SamplingError;
use crate::text::TextSide;

use super::Llm1Error;
use super::options::invalid;

/// A prompt as the bus carries it.
pub enum BusPrompt {
    Text(String),
    /// (role, content) pairs.
    Chat(Vec<(String, String)>),
}

/// Prepares a request on the text side; never touches the weights.
pub fn prepare(
    text: &TextSide,
    prompt: BusPrompt,
    options: RequestOptions,
    default_max_tokens: u32,
) -> Result<GenerateRequest, Llm1Error> {
    let prompt = match prompt {
        BusPrompt::Text(text) => Prompt::Text(text),
        BusPrompt::Chat(messages) => Prompt::Chat(
            messages
                .into_iter()
                .map(|(role, content)| Message { role, content })
                .collect(),
        ),
    };
    text.prepare(prompt, options, default_max_tokens)
        .map_err(|e| match e {
            RequestError::NoMessages => Llm1Error::InvalidArgument(e.to_string()),
            RequestError::NoChatTemplate => {
                Llm1Error::InvalidArgument(format!("{e}; use Generate"))
            }
            RequestError::Chat(ChatError::Rejected(_)) => Llm1Error::InvalidArgument(e.to_string()),
            RequestError::Chat(ChatError::Syntax(_) | ChatError::Render(_))
            | RequestError::Tokenize { .. } => Llm1Error::Internal(e.to_string()),
            RequestError::ContextOverflow { .. } => Llm1Error::ContextOverflow(e.to_string()),
            RequestError::Sampling(SamplingError::OutOfRange {
                key,
                value,
                allowed,
            }) => invalid(key, &format!("is {value}, out of range: allowed {allowed}")),
            RequestError::Sampling(SamplingError::NoFiniteLogit { .. }) => {
                Llm1Error::Internal(e.to_string())
            }
            RequestError::Constraint(ConstraintError::Invalid { .. }) => {
                Llm1Error::InvalidOption(e.to_string())
            }
            RequestError::Constraint(
                ConstraintError::Vocabulary(_) | ConstraintError::Failed(_),
            ) => Llm1Error::Internal(e.to_string()),
        })
}

/// The prompt's tokens, as `Generate` feeds them to the model (special tokens such as BOS
/// included); `Tokenize` returns them.
pub fn encode_prompt(text: &TextSide, prompt: &str) -> Result<Vec<u32>, Llm1Error> {
    text.encode_prompt(prompt)
        .map_err(|e| Llm1Error::Internal(format!("cannot tokenize the prompt: {e}")))
}
