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

use crate::model::attention::DecodeAttentionState;
use crate::model::{Logits, Model, ModelError, ModelState};
use tract_onnx::tract_core::plan::{LaneId, Seating};

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
    #[error("lane {lane} of {lanes}")]
    NoLane { lane: usize, lanes: usize },
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

/// Several token sequences (lanes) in one plan state, each with its own KV cache: prompts are
/// fed one lane at a time, and a decode step advances every lane it names in one forward
/// pass, so that the weights are read once for all of them ([`Lanes::step`]).
pub struct Lanes {
    model: Arc<Model>,
    state: ModelState,
    /// Per lane, the tokens whose keys and values are in its cache, in order.
    cached: Vec<Vec<u32>>,
    context_length: usize,
    vocab: usize,
}

impl Lanes {
    pub fn new(
        model: Arc<Model>,
        lanes: usize,
        context_length: usize,
        vocab: usize,
    ) -> Result<Self, SequenceError> {
        let state = model.new_state()?;
        Ok(Lanes {
            model,
            state,
            cached: vec![Vec::new(); lanes.max(1)],
            context_length,
            vocab,
        })
    }

    /// How many lanes there are.
    pub fn count(&self) -> usize {
        self.cached.len()
    }

    /// Tokens currently held by a lane's KV cache.
    pub fn cached(&self, lane: usize) -> &[u32] {
        &self.cached[lane]
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Prepares a lane's cache for `prompt` and returns how many of its tokens are already
    /// there. At least the last prompt token is always left to feed, since its logits
    /// are needed to sample the first new token.
    pub fn reuse_prefix(&mut self, lane: usize, prompt: &[u32]) -> Result<usize, SequenceError> {
        let common = self.cached[lane]
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(prompt.len().saturating_sub(1));
        if keep < self.cached[lane].len() {
            // The positions past `keep` are forgotten where they lie: the next tokens are
            // written over them.
            for state in self.state.op_states.iter_mut().flatten() {
                if let Some(attention) = state.downcast_mut::<DecodeAttentionState>() {
                    attention.truncate(lane, keep);
                }
            }
            self.cached[lane].truncate(keep);
        }
        Ok(keep)
    }

    /// Forgets everything a lane holds.
    pub fn reset(&mut self, lane: usize) -> Result<(), SequenceError> {
        self.state.reset_lanes(&[LaneId(lane)])?;
        self.cached[lane].clear();
        crate::memory::release_free_heap();
        Ok(())
    }

    /// Runs `tokens` through the model after the lane's cached ones and returns the logits
    /// that follow the last of them.
    pub fn feed(&mut self, lane: usize, tokens: &[u32]) -> Result<Vec<f32>, SequenceError> {
        self.check(lane, tokens)?;
        let mut logits = Vec::new();
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            logits.clear();
            self.forward(&[lane], chunk, Rows::Last, &mut logits)?;
        }
        if tokens.len() > 1 {
            crate::memory::release_free_heap();
        }
        Ok(logits)
    }

    /// Runs `tokens` through the model after the lane's cached ones and returns the logits
    /// that follow each of them, one row of `vocab` after another: for scoring a text. The
    /// model must compute every position's logits ([`Logits::EveryPosition`]); the caller
    /// bounds the memory by the length of `tokens` (`tokens.len() × vocab` floats).
    pub fn feed_every(&mut self, lane: usize, tokens: &[u32]) -> Result<Vec<f32>, SequenceError> {
        if self.model.logits() != Logits::EveryPosition {
            return Err(SequenceError::LastPositionOnly);
        }
        self.check(lane, tokens)?;
        let mut logits = Vec::with_capacity(tokens.len() * self.vocab);
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            self.forward(&[lane], chunk, Rows::Every, &mut logits)?;
        }
        Ok(logits)
    }

    /// One decode step of several lanes in one forward pass: `steps` names each lane once,
    /// with the token it is fed. Returns the logits that follow, one row of `vocab` per step,
    /// in the order of `steps`.
    pub fn step(&mut self, steps: &[(usize, u32)]) -> Result<Vec<f32>, SequenceError> {
        let (lanes, tokens): (Vec<usize>, Vec<u32>) = steps.iter().copied().unzip();
        for (&lane, &token) in lanes.iter().zip(&tokens) {
            self.check(lane, &[token])?;
        }
        let mut logits = Vec::with_capacity(steps.len() * self.vocab);
        self.forward(&lanes, &tokens, Rows::Every, &mut logits)?;
        Ok(logits)
    }

    fn check(&self, lane: usize, tokens: &[u32]) -> Result<(), SequenceError> {
        if lane >= self.cached.len() {
            return Err(SequenceError::NoLane {
                lane,
                lanes: self.cached.len(),
            });
        }
        let needed = self.cached[lane].len() + tokens.len();
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

    /// One forward pass: one seat per lane of `lanes`, each fed `tokens.len() / lanes.len()`
    /// tokens of `tokens` (one lane and a chunk of its prompt, or several lanes and a token
    /// each); appends the logits of the `rows` asked for to `out`.
    fn forward(
        &mut self,
        lanes: &[usize],
        tokens: &[u32],
        rows: Rows,
        out: &mut Vec<f32>,
    ) -> Result<(), SequenceError> {
        let seats = lanes.len();
        let n = tokens.len() / seats;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let positions: Vec<i64> = lanes
            .iter()
            .flat_map(|&lane| {
                let start = self.cached[lane].len() as i64;
                start..start + n as i64
            })
            .collect();
        let ids = Tensor::from_shape(&[seats, n], &ids)?;
        let positions = Tensor::from_shape(&[seats, n], &positions)?;
        let seating = if self.cached.len() == 1 {
            Seating::single()
        } else {
            Seating::new(self.cached.len(), lanes.iter().map(|&lane| LaneId(lane)))?
        };
        self.state.seat(seating);
        let outputs = self
            .state
            .run(tvec![ids.into_tvalue(), positions.into_tvalue()])?;
        for (seat, &lane) in lanes.iter().enumerate() {
            self.cached[lane].extend_from_slice(&tokens[seat * n..(seat + 1) * n]);
        }
        let logits = outputs[0].to_plain_array_view::<f32>()?;
        let vocab = *logits
            .shape()
            .last()
            .context("logits without a vocabulary axis")?;
        let all = logits.as_slice().context("logits are not contiguous")?;
        // Per seat, the last position's row, or every position's.
        let per_seat = all.len() / seats;
        match rows {
            Rows::Last => {
                for seat in all.chunks_exact(per_seat) {
                    out.extend_from_slice(&seat[per_seat - vocab..]);
                }
            }
            Rows::Every if all.len() == seats * n * vocab => out.extend_from_slice(all),
            Rows::Every => {
                return Err(SequenceError::Run(format_err!(
                    "{} logits for {seats} × {n} positions of a vocabulary of {vocab}",
                    all.len()
                )));
            }
        }
        Ok(())
    }
}

/// One token sequence and its KV cache: a [`Lanes`] of one lane, for generation one
/// request at a time, benchmarks and numerical checks.
pub struct Sequence {
    lanes: Lanes,
}

impl Sequence {
    pub fn new(
        model: Arc<Model>,
        context_length: usize,
        vocab: usize,
    ) -> Result<Self, SequenceError> {
        Ok(Sequence {
            lanes: Lanes::new(model, 1, context_length, vocab)?,
        })
    }

    /// Tokens currently held by the KV cache.
    pub fn cached(&self) -> &[u32] {
        self.lanes.cached(0)
    }

    pub fn context_length(&self) -> usize {
        self.lanes.context_length()
    }

    /// See [`Lanes::reuse_prefix`].
    pub fn reuse_prefix(&mut self, prompt: &[u32]) -> Result<usize, SequenceError> {
        self.lanes.reuse_prefix(0, prompt)
    }

    /// Forgets everything cached.
    pub fn reset(&mut self) -> Result<(), SequenceError> {
        self.lanes.reset(0)
    }

    /// See [`Lanes::feed`].
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SequenceError> {
        self.lanes.feed(0, tokens)
    }

    /// See [`Lanes::feed_every`].
    pub fn feed_every(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SequenceError> {
        self.lanes.feed_every(0, tokens)
    }
}

/// The rows of a forward pass's logits a caller keeps.
#[derive(Clone, Copy)]
enum Rows {
    Last,
    Every,
}
