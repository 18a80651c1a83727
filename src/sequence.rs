//! A token sequence in the model: which tokens its KV cache holds, and the forward passes
//! that extend it. Token ids in, logits out; no text and no sampling (see
//! [`crate::engine::Conversation`]).
//!
//! The KV cache lives inside the tract state (tract-transformers turned the graph's
//! past/present tensors into op state), so a step feeds only new tokens. Prompts are
//! fed in chunks to bound the activation memory of a long prefill. A request whose prompt
//! starts with the tokens already cached — the next turn of a chat — skips recomputing them.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::TractErrorContext;

use crate::model::{Model, ModelError, ModelState};

/// Tokens per forward pass while prefilling: large enough that the FP8 panels are reused
/// across many rows, small enough to bound the activations of a 4096-token prompt.
pub const PREFILL_CHUNK: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("{needed} tokens do not fit the context of {context_length}")]
    ContextFull {
        needed: usize,
        context_length: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("running the model: {0:#}")]
    Run(TractError),
}

impl From<TractError> for SequenceError {
    fn from(e: TractError) -> Self {
        SequenceError::Run(e)
    }
}

/// The tokens fed so far and their keys and values.
pub struct Sequence {
    model: Arc<Model>,
    state: ModelState,
    /// The tokens whose keys and values are in the cache, in order.
    cached: Vec<u32>,
    context_length: usize,
    vocab: usize,
}

impl Sequence {
    pub fn new(
        model: Arc<Model>,
        context_length: usize,
        vocab: usize,
    ) -> Result<Self, SequenceError> {
        let state = model.new_state()?;
        Ok(Sequence {
            model,
            state,
            cached: Vec::new(),
            context_length,
            vocab,
        })
    }

    /// Tokens currently held by the KV cache.
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Prepares the cache for `prompt` and returns how many of its tokens are already
    /// there. At least the last prompt token is always left to feed, since its logits
    /// are needed to sample the first new token.
    pub fn reuse_prefix(&mut self, prompt: &[u32]) -> Result<usize, SequenceError> {
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(prompt.len().saturating_sub(1));
        if keep < self.cached.len() {
            // Dropping a suffix of the cache is a fresh state replayed up to `keep`:
            // rare (a regenerated answer, an edited history) and always correct.
            self.reset()?;
            if keep > 0 {
                self.feed(&prompt[..keep])?;
            }
        }
        Ok(keep)
    }

    /// Forgets everything cached.
    pub fn reset(&mut self) -> Result<(), SequenceError> {
        self.state = self.model.new_state()?;
        self.cached.clear();
        crate::memory::release_free_heap();
        Ok(())
    }

    /// Runs `tokens` through the model after the cached ones and returns the logits that
    /// follow the last of them.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SequenceError> {
        let needed = self.cached.len() + tokens.len();
        if needed > self.context_length {
            return Err(SequenceError::ContextFull {
                needed,
                context_length: self.context_length,
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(SequenceError::BadToken {
                id,
                vocab: self.vocab,
            });
        }
        let mut logits = Vec::new();
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            logits = self.forward(chunk)?;
        }
        if tokens.len() > 1 {
            crate::memory::release_free_heap();
        }
        Ok(logits)
    }

    fn forward(&mut self, chunk: &[u32]) -> Result<Vec<f32>, SequenceError> {
        let start = self.cached.len() as i64;
        let n = chunk.len();
        let ids: Vec<i64> = chunk.iter().map(|&t| t as i64).collect();
        let positions: Vec<i64> = (start..start + n as i64).collect();
        let ids = Tensor::from_shape(&[1, n], &ids)?;
        let positions = Tensor::from_shape(&[1, n], &positions)?;
        let outputs = self
            .state
            .run(tvec![ids.into_tvalue(), positions.into_tvalue()])?;
        self.cached.extend_from_slice(chunk);
        let logits = outputs[0].to_plain_array_view::<f32>()?;
        let vocab = *logits
            .shape()
            .last()
            .context("logits without a vocabulary axis")?;
        let all = logits.as_slice().context("logits are not contiguous")?;
        Ok(all[all.len() - vocab..].to_vec())
    }
}
