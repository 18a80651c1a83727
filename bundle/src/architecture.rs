//! Which architectures a bundle can hold, decided once.
//!
//! The exporter refuses a checkpoint (`config.json` or GGUF metadata) and [`Bundle::open`]
//! refuses a manifest by the same rules, so that whatever the exporter accepts the daemon
//! accepts too, and a hand-edited manifest cannot hand the graph a shape it cannot compute:
//! a zero dimension, KV heads that do not divide the query heads, an odd head dimension for
//! the rotary embedding, which rotates halves.
//!
//! [`Bundle::open`]: crate::Bundle::open

use std::fmt;

use crate::manifest::Architecture;

/// A field of [`Architecture`] that validation judges. The exporter names it after the key it
/// read the value from (`num_key_value_heads`, `llama.attention.head_count_kv`), so that the
/// user is told what to fix in their own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchitectureField {
    HiddenSize,
    NumLayers,
    NumHeads,
    NumKvHeads,
    HeadDim,
    IntermediateSize,
    VocabSize,
    ContextLength,
    MaxContextLength,
    SlidingWindow,
}

impl ArchitectureField {
    /// The field's key in `bundle.json`.
    pub fn manifest_key(self) -> &'static str {
        match self {
            ArchitectureField::HiddenSize => "hidden_size",
            ArchitectureField::NumLayers => "num_layers",
            ArchitectureField::NumHeads => "num_heads",
            ArchitectureField::NumKvHeads => "num_kv_heads",
            ArchitectureField::HeadDim => "head_dim",
            ArchitectureField::IntermediateSize => "intermediate_size",
            ArchitectureField::VocabSize => "vocab_size",
            ArchitectureField::ContextLength => "context_length",
            ArchitectureField::MaxContextLength => "max_context_length",
            ArchitectureField::SlidingWindow => "sliding_window",
        }
    }
}

/// The rule a value broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchitectureRule {
    /// Every dimension is at least 1.
    Positive,
    /// Grouped-query attention shares each KV head among a whole number of query heads.
    DividesHeads { heads: usize },
    /// The rotary embedding rotates the two halves of a head.
    Even,
    /// The maximum context covers the default one.
    CoversContext { context: usize },
}

impl fmt::Display for ArchitectureRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchitectureRule::Positive => write!(f, "must be positive"),
            ArchitectureRule::DividesHeads { heads } => {
                write!(f, "must divide the number of attention heads, {heads}")
            }
            ArchitectureRule::Even => {
                write!(f, "rotary embedding needs an even head dimension")
            }
            ArchitectureRule::CoversContext { context } => {
                write!(f, "must be at least the default context, {context}")
            }
        }
    }
}

/// Why an architecture cannot be a bundle's: which field, its value, the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} = {value} is not supported: {rule}", .field.manifest_key())]
pub struct ArchitectureError {
    pub field: ArchitectureField,
    pub value: usize,
    pub rule: ArchitectureRule,
}

/// Why a run cannot have the context it asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("a context of 0 tokens holds no prompt")]
    Zero,
    #[error(
        "a context of {requested} tokens is beyond this model's maximum of {max} \
         (its rotary tables and training end there)"
    )]
    BeyondMaximum { requested: usize, max: usize },
}

impl Architecture {
    /// The longest context a run may choose; bundles that predate the choice have their
    /// default context as maximum.
    pub fn max_context(&self) -> usize {
        self.max_context_length.unwrap_or(self.context_length)
    }

    /// The context a run has: `requested`, up to [`max_context`](Self::max_context), or the
    /// bundle's default.
    pub fn run_context(&self, requested: Option<usize>) -> Result<usize, ContextError> {
        match requested {
            None => Ok(self.context_length),
            Some(0) => Err(ContextError::Zero),
            Some(requested) if requested > self.max_context() => Err(ContextError::BeyondMaximum {
                requested,
                max: self.max_context(),
            }),
            Some(requested) => Ok(requested),
        }
    }

    /// Checks the shape can be built as a bundle's graph; the first broken rule is returned.
    pub fn validate(&self) -> Result<(), ArchitectureError> {
        use ArchitectureField as F;
        let broken = |field, value, rule| Err(ArchitectureError { field, value, rule });
        for (field, value) in [
            (F::HiddenSize, self.hidden_size),
            (F::NumLayers, self.num_layers),
            (F::NumHeads, self.num_heads),
            (F::NumKvHeads, self.num_kv_heads),
            (F::HeadDim, self.head_dim),
            (F::IntermediateSize, self.intermediate_size),
            (F::VocabSize, self.vocab_size),
            (F::ContextLength, self.context_length),
            (F::MaxContextLength, self.max_context()),
            (F::SlidingWindow, self.sliding_window.unwrap_or(1)),
        ] {
            if value == 0 {
                return broken(field, value, ArchitectureRule::Positive);
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return broken(
                F::NumKvHeads,
                self.num_kv_heads,
                ArchitectureRule::DividesHeads {
                    heads: self.num_heads,
                },
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return broken(F::HeadDim, self.head_dim, ArchitectureRule::Even);
        }
        if self.max_context() < self.context_length {
            return broken(
                F::MaxContextLength,
                self.max_context(),
                ArchitectureRule::CoversContext {
                    context: self.context_length,
                },
            );
        }
        Ok(())
    }
}
