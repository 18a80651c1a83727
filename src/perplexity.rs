//! Perplexity of a model over a text and, against a reference model (the same weights in f32),
//! how far its next-token distributions stray: the fidelity figures a faster but less exact
//! kernel is judged by (`marengod perplexity`).
//!
//! The text is scored as llama-perplexity scores it, so that the figures compare with
//! llama.cpp's on the same text: the tokens are cut into consecutive windows of `window`
//! tokens (the rest after the last whole window is dropped); each window is run from an empty
//! cache, its first token replaced by BOS when the tokenizer adds one; and only the second
//! half of each window is scored — the logits at positions `window/2 .. window-1` predicting
//! the tokens that follow them — so that every scored token has at least half a window of
//! context. Perplexity is `exp` of the mean negative log-likelihood of those tokens; the KL
//! divergence is `KL(reference ‖ model)` in nats, the reference's distribution weighting, as
//! llama-perplexity's `--kl-divergence` computes it (which rounds the reference's
//! log-probabilities to 16 bits and skips those below e⁻¹⁶; here both are exact, in f64).

use std::ops::Range;

use crate::engine::{Engine, EngineError};
use crate::sequence::{PREFILL_CHUNK, SequenceError};
use crate::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("the text is empty")]
    EmptyText,
    #[error("a window of {window} tokens scores no token: give at least 3")]
    WindowTooSmall { window: usize },
    #[error("a window of {window} tokens exceeds the {which}'s context of {context}")]
    WindowExceedsContext {
        window: usize,
        which: &'static str,
        context: usize,
    },
    #[error(
        "the text is {tokens} tokens, fewer than one window of {window}: give a longer text \
         or a smaller --context"
    )]
    TextTooShort { tokens: usize, window: usize },
    #[error(
        "the reference's vocabulary ({reference} tokens) is not the model's ({model}): they \
         cannot be compared"
    )]
    VocabularyMismatch { model: usize, reference: usize },
    #[error("the reference's tokenizer cuts the text into other tokens than the model's")]
    TokenizationMismatch,
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Sequence(#[from] SequenceError),
}

/// Consecutive, non-overlapping windows of `len` tokens from the start of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub len: usize,
    pub count: usize,
}

impl Windows {
    /// As many whole windows of `len` as `tokens` holds.
    pub fn new(tokens: usize, len: usize) -> Result<Windows, PerplexityError> {
        if len < 3 {
            return Err(PerplexityError::WindowTooSmall { window: len });
        }
        if tokens < len {
            return Err(PerplexityError::TextTooShort {
                tokens,
                window: len,
            });
        }
        Ok(Windows {
            len,
            count: tokens / len,
        })
    }

    /// The tokens of window `index` within the text.
    pub fn tokens(&self, index: usize) -> Range<usize> {
        index * self.len..(index + 1) * self.len
    }

    /// The positions within a window whose logits are scored, each predicting the token after
    /// it: the second half, as llama-perplexity's `first = n_ctx/2`.
    pub fn scored(&self) -> Range<usize> {
        self.len / 2..self.len - 1
    }

    /// Scored positions over all windows.
    pub fn scored_positions(&self) -> usize {
        self.count * self.scored().len()
    }
}

/// `log(softmax(logits))`, in f64 so that the small differences KL measures are not lost to
/// rounding.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let log_sum = max
        + logits
            .iter()
            .map(|&v| (f64::from(v) - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&v| f64::from(v) - log_sum).collect()
}

/// `KL(p ‖ q)` in nats from the log-probabilities of both; terms where `p` is 0 add nothing.
pub fn kl_divergence(log_p: &[f64], log_q: &[f64]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .filter(|(lp, _)| **lp > f64::NEG_INFINITY)
        .map(|(lp, lq)| lp.exp() * (lp - lq))
        .sum()
}

/// The index of the largest value, the first one on ties (as llama-perplexity's top-1).
pub fn argmax(values: &[f64]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(best, max), (i, &v)| {
            if v > max { (i, v) } else { (best, max) }
        })
        .0
}

/// Running sums over the scored positions.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    positions: usize,
    nll: f64,
    reference_nll: f64,
    kl_sum: f64,
    kl_max: f64,
    top1_agree: usize,
}

impl Tally {
    /// Scores one position: the model's logits there, and the token that follows.
    pub fn add(&mut self, logits: &[f32], next: u32) {
        let log_q = log_softmax(logits);
        self.nll -= log_q[next as usize];
        self.positions += 1;
    }

    /// Scores one position against the reference's logits at the same position.
    pub fn add_compared(&mut self, logits: &[f32], reference: &[f32], next: u32) {
        let log_q = log_softmax(logits);
        let log_p = log_softmax(reference);
        self.nll -= log_q[next as usize];
        self.reference_nll -= log_p[next as usize];
        let kl = kl_divergence(&log_p, &log_q);
        self.kl_sum += kl;
        self.kl_max = self.kl_max.max(kl);
        self.top1_agree += usize::from(argmax(&log_q) == argmax(&log_p));
        self.positions += 1;
    }

    pub fn positions(&self) -> usize {
        self.positions
    }

    /// `exp` of the mean negative log-likelihood.
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.positions as f64).exp()
    }

    /// The figures against the reference, for a tally kept with [`Tally::add_compared`].
    pub fn comparison(&self) -> Comparison {
        let n = self.positions as f64;
        Comparison {
            perplexity: (self.reference_nll / n).exp(),
            kl_mean: self.kl_sum / n,
            kl_max: self.kl_max,
            top1_agreement_percent: 100.0 * self.top1_agree as f64 / n,
        }
    }
}

/// The model against the reference over the same scored positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// The reference's own perplexity.
    pub perplexity: f64,
    /// `KL(reference ‖ model)` in nats, mean and largest over the positions.
    pub kl_mean: f64,
    pub kl_max: f64,
    /// Positions where both models' most likely next token is the same.
    pub top1_agreement_percent: f64,
}

/// What `marengod perplexity` prints.
#[derive(Debug, Clone)]
pub struct Report {
    pub tokens: usize,
    pub windows: Windows,
    pub perplexity: f64,
    pub reference: Option<Comparison>,
}

/// Scores `text` with `model` and, if given, against `reference`. Both engines must compute
/// every position's logits ([`crate::model::Logits::EveryPosition`]). `window` defaults to
/// the model's context length.
pub fn evaluate(
    model: &Engine,
    reference: Option<&Engine>,
    text: &str,
    window: Option<usize>,
) -> Result<Report, PerplexityError> {
    if text.is_empty() {
        return Err(PerplexityError::EmptyText);
    }
    let tokens = model.tokenizer().encode(text, true)?;
    if let Some(reference) = reference {
        let (ours, theirs) = (vocab(model), vocab(reference));
        if ours != theirs {
            return Err(PerplexityError::VocabularyMismatch {
                model: ours,
                reference: theirs,
            });
        }
        if reference.tokenizer().encode(text, true)? != tokens {
            return Err(PerplexityError::TokenizationMismatch);
        }
    }
    let context = model.text().context_length();
    let windows = Windows::new(tokens.len(), window.unwrap_or(context))?;
    for (which, engine) in [("model", Some(model)), ("reference", reference)] {
        let Some(engine) = engine else { continue };
        let context = engine.text().context_length();
        if windows.len > context {
            return Err(PerplexityError::WindowExceedsContext {
                window: windows.len,
                which,
                context,
            });
        }
    }
    // llama-perplexity starts every window with BOS when the tokenizer adds one.
    let bos = model
        .manifest()
        .special_tokens
        .bos
        .filter(|bos| tokens.first() == Some(bos));

    let mut ours = model.new_sequence()?;
    let mut theirs = reference.map(Engine::new_sequence).transpose()?;
    let vocab = vocab(model);
    let mut tally = Tally::default();
    for index in 0..windows.count {
        let mut window = tokens[windows.tokens(index)].to_vec();
        if let Some(bos) = bos {
            window[0] = bos;
        }
        let scored = windows.scored();
        let context = &window[..scored.start];
        ours.reset()?;
        ours.feed(context)?;
        if let Some(theirs) = theirs.as_mut() {
            theirs.reset()?;
            theirs.feed(context)?;
        }
        // Chunk by chunk, so that a long window's logits are never held all at once.
        for start in scored.clone().step_by(PREFILL_CHUNK) {
            let end = (start + PREFILL_CHUNK).min(scored.end);
            let chunk = &window[start..end];
            let logits = ours.feed_every(chunk)?;
            let reference_logits = theirs.as_mut().map(|s| s.feed_every(chunk)).transpose()?;
            for (row, &next) in window[start + 1..end + 1].iter().enumerate() {
                let rows = row * vocab..(row + 1) * vocab;
                match &reference_logits {
                    Some(theirs) => tally.add_compared(&logits[rows.clone()], &theirs[rows], next),
                    None => tally.add(&logits[rows], next),
                }
            }
        }
        tracing::info!(
            window = index + 1,
            of = windows.count,
            perplexity = tally.perplexity(),
            "window scored"
        );
    }
    Ok(Report {
        tokens: tokens.len(),
        windows,
        perplexity: tally.perplexity(),
        reference: reference.map(|_| tally.comparison()),
    })
}

fn vocab(engine: &Engine) -> usize {
    engine.manifest().architecture.vocab_size
}

#[cfg(test)]
mod tests {
    use super::*;

    const LN2: f64 = std::f64::consts::LN_2;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn log_softmax_of_hand_computed_distributions() {
        // Equal logits: uniform.
        let uniform = log_softmax(&[3.0, 3.0, 3.0, 3.0]);
        assert!(uniform.iter().all(|&l| close(l, -(4f64.ln()))));
        // Logits ln 1, ln 2, ln 5: probabilities 1/8, 2/8, 5/8, whatever the offset.
        let offset = 100.0;
        let logits = [offset, offset + 2f32.ln(), offset + 5f32.ln()];
        let probs: Vec<f64> = log_softmax(&logits).iter().map(|l| l.exp()).collect();
        for (p, expected) in probs.iter().zip([0.125, 0.25, 0.625]) {
            assert!((p - expected).abs() < 1e-6, "{probs:?}");
        }
        // Large logits do not overflow.
        let big = log_softmax(&[1e30, 0.0]);
        assert_eq!(big[0], 0.0);
        assert_eq!(big[1], -f64::from(1e30f32));
    }

    #[test]
    fn kl_divergence_of_hand_computed_distributions() {
        let half = [-LN2, -LN2];
        let quarter_three = [(0.25f64).ln(), (0.75f64).ln()];
        assert_eq!(kl_divergence(&half, &half), 0.0);
        // KL([½,½] ‖ [¼,¾]) = ½ ln 2 + ½ ln(2/3).
        let expected = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!(close(kl_divergence(&half, &quarter_three), expected));
        // Not symmetric: KL([¼,¾] ‖ [½,½]) = ¼ ln ½ + ¾ ln (3/2).
        let reverse = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!(close(kl_divergence(&quarter_three, &half), reverse));
        // A token the reference rules out adds nothing.
        let certain = [0.0, f64::NEG_INFINITY];
        assert!(close(kl_divergence(&certain, &half), LN2));
    }

    #[test]
    fn windows_score_the_second_half_as_llama_perplexity() {
        let windows = Windows::new(1000, 256).unwrap();
        assert_eq!(windows.count, 3, "the last 232 tokens make no whole window");
        assert_eq!(windows.tokens(1), 256..512);
        // Positions 128..254 predict tokens 129..255.
        assert_eq!(windows.scored(), 128..255);
        assert_eq!(windows.scored_positions(), 3 * 127);
        let odd = Windows::new(7, 7).unwrap();
        assert_eq!(odd.scored(), 3..6);
        assert_eq!(Windows::new(3, 3).unwrap().scored(), 1..2);
    }

    #[test]
    fn windows_refuse_what_scores_nothing() {
        assert!(matches!(
            Windows::new(100, 2),
            Err(PerplexityError::WindowTooSmall { window: 2 })
        ));
        assert!(matches!(
            Windows::new(100, 128),
            Err(PerplexityError::TextTooShort {
                tokens: 100,
                window: 128
            })
        ));
    }

    #[test]
    fn a_tally_of_hand_computed_positions() {
        // Two positions of a uniform model over 4 tokens: perplexity 4.
        let mut tally = Tally::default();
        tally.add(&[0.0; 4], 1);
        tally.add(&[7.0; 4], 3);
        assert_eq!(tally.positions(), 2);
        assert!(close(tally.perplexity(), 4.0));

        // The model puts ½,½ on tokens 0 and 1, the reference ¼,¾; the next token is 1 then 0.
        let model = [0.0, 0.0];
        let reference = [0.0, 3f32.ln()];
        let mut tally = Tally::default();
        tally.add_compared(&model, &reference, 1);
        tally.add_compared(&model, &reference, 0);
        assert!(close(tally.perplexity(), 2.0));
        let figures = tally.comparison();
        // Reference: exp(-(ln ¾ + ln ¼)/2) = 4/√3.
        assert!((figures.perplexity - 4.0 / 3f64.sqrt()).abs() < 1e-6);
        let kl = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((figures.kl_mean - kl).abs() < 1e-7);
        assert!((figures.kl_max - kl).abs() < 1e-7);
        // A tie in the model resolves to token 0, the reference prefers 1.
        assert_eq!(figures.top1_agreement_percent, 0.0);
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }
}
