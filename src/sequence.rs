//! A token sequence in the model: which tokens its KV cache holds, and the forward passes
//! that extend it. Token ids in, logits out; no text and no sampling (see
//! [`crate::engine::Conversation`]).
//!
//! The KV cache lives inside the tract state (tract-transformers turned the graph's
//! past/present tensors into op state), so a step feeds only new tokens. Prompts are
//! fed in chunks to bound the activation memory of a long prefill. A request whose prompt
//! starts with the tokens already cached — the next turn of a chat — skips recomputing them.
//! Generation reads the logits after the last token fed ([`Sequence::feed`]); scoring a text
//! reads them after every token ([`Sequence::feed_every`]).

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{TractErrorContext, format_err};

use crate::model::{Logits, Model, ModelError, ModelState};

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
    #[error("the model computes the last position's logits only: load it with every position's")]
    LastPositionOnly,
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
        self.check(tokens)?;
        let mut logits = Vec::new();
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            logits.clear();
            self.forward(chunk, Rows::Last, &mut logits)?;
        }
        if tokens.len() > 1 {
            crate::memory::release_free_heap();
        }
        Ok(logits)
    }

    /// Runs `tokens` through the model after the cached ones and returns the logits that
    /// follow each of them, one row of `vocab` after another: for scoring a text. The model
    /// must compute every position's logits ([`Logits::EveryPosition`]); the caller bounds
    /// the memory by the length of `tokens` (`tokens.len() × vocab` floats).
    pub fn feed_every(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SequenceError> {
        if self.model.logits() != Logits::EveryPosition {
            return Err(SequenceError::LastPositionOnly);
        }
        self.check(tokens)?;
        let mut logits = Vec::with_capacity(tokens.len() * self.vocab);
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            self.forward(chunk, Rows::Every, &mut logits)?;
        }
        Ok(logits)
    }

    fn check(&self, tokens: &[u32]) -> Result<(), SequenceError> {
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
        Ok(())
    }

    /// One forward pass over `chunk`; appends the logits of the `rows` asked for to `out`.
    fn forward(
        &mut self,
        chunk: &[u32],
        rows: Rows,
        out: &mut Vec<f32>,
    ) -> Result<(), SequenceError> {
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
        match rows {
            Rows::Last => out.extend_from_slice(&all[all.len() - vocab..]),
            Rows::Every if all.len() == n * vocab => out.extend_from_slice(all),
            Rows::Every => {
                return Err(SequenceError::Run(format_err!(
                    "{} logits for {n} positions of a vocabulary of {vocab}",
                    all.len()
                )));
            }
        }
        Ok(())
    }
}

/// The rows of a forward pass's logits a caller keeps.
#[derive(Clone, Copy)]
enum Rows {
    Last,
    Every,
}
