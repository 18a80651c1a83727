//! The weights side of a model ([`Engine`]: the mapped weights, the tract model and its plan)
//! and the conversations run on it ([`Conversation`]). This is the boundary the scheduler and
//! the offline `generate` command call; neither sees tract or tensors.
//!
//! The engine shares the bundle's [`TextSide`] but does not own it: the daemon drops the engine
//! when idle, unmapping the weights, and keeps the text side, which answers everything that
//! does not run the model.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::model::{Logits, Model};
use crate::request::GenerateRequest;
use crate::sampler::Sampler;
use crate::sequence::{Sequence, SequenceError};
use crate::text::{TextError, TextSide};
use crate::tokenizer::{TextStream, Tokenizer};
use marengo_bundle::Bundle;
use marengo_bundle::manifest::Manifest;

/// Why a generation ended: the one reason the engine, the scheduler and the D-Bus `Finished`
/// signal share. The engine itself ends with `Stop` or `Length`, or with the reason its caller's
/// stop check returns; the scheduler adds `Error` and the ends of requests that never ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    /// End of sequence, a stop string, or the end of a structured-output constraint's match.
    Stop = 1,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// `Cancel` by its owner.
    Cancelled,
    /// Its client left the bus.
    Disconnected,
    /// The daemon is stopping.
    Shutdown,
    /// The engine failed.
    Error,
}

impl EndReason {
    /// The reason's name on the wire (`Finished`'s `reason` argument) and in `--stats`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Stop => "stop",
            EndReason::Length => "length",
            EndReason::Cancelled => "cancelled",
            EndReason::Disconnected => "disconnected",
            EndReason::Shutdown => "shutdown",
            EndReason::Error => "error",
        }
    }
}

/// Figures of one finished generation.
#[derive(Debug, Clone)]
pub struct GenerationOutcome {
    pub reason: EndReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV entries were reused from the previous request.
    pub reused_tokens: usize,
    pub generated_tokens: usize,
    /// The generated ids, the last one included even when it is an end-of-sequence token.
    pub tokens: Vec<u32>,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// The structured-output constraint's mean time per generated token, in seconds, when
    /// the request has one: masking the logits and moving past the sampled token.
    pub constraint_s_per_token: Option<f64>,
}

/// Options for loading a bundle.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Worker threads for the kernels; `None` uses every core.
    pub threads: Option<usize>,
    /// Hash every file against the manifest (slow for a 7 GB bundle).
    pub verify_hashes: bool,
    /// The positions whose logits a forward pass computes: the last one for generation,
    /// every one for scoring a text ([`crate::perplexity`]).
    pub logits: Logits,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the bundle {0} changed on disk since its tokenizer was loaded; restart to serve the \
         new one"
    )]
    BundleChanged(std::path::PathBuf),
    #[error(transparent)]
    Bundle(#[from] marengo_bundle::BundleError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Sampling(#[from] crate::sampler::SamplingError),
    #[error(transparent)]
    Constraint(#[from] crate::constraint::ConstraintError),
    #[error("setting up {threads} kernel threads: {message}")]
    Threads { threads: usize, message: String },
}

/// A loaded, memory-mapped model. Shared between conversations with `Arc`.
pub struct Engine {
    bundle: Bundle,
    model: Arc<Model>,
    text: Arc<TextSide>,
}

impl Engine {
    /// Loads both sides of the bundle in `dir`.
    pub fn load(dir: &Path, options: &EngineOptions) -> Result<Arc<Engine>, EngineError> {
        let bundle = open(dir, options)?;
        let text = Arc::new(TextSide::load(&bundle)?);
        Self::with_text(bundle, text, options.logits)
    }

    /// Loads the weights of the bundle in `dir` again, for a text side loaded before (after an
    /// idle unload). The bundle must still be the one `text` was read from.
    pub fn load_weights(
        dir: &Path,
        options: &EngineOptions,
        text: Arc<TextSide>,
    ) -> Result<Arc<Engine>, EngineError> {
        let bundle = open(dir, options)?;
        if bundle.manifest() != text.manifest() {
            return Err(EngineError::BundleChanged(dir.to_path_buf()));
        }
        Self::with_text(bundle, text, options.logits)
    }

    fn with_text(
        bundle: Bundle,
        text: Arc<TextSide>,
        logits: Logits,
    ) -> Result<Arc<Engine>, EngineError> {
        let model = Arc::new(Model::load(&bundle, logits)?);
        // Parsing and optimising the graph leaves megabytes of freed protobuf and tract
        // intermediates on the heap.
        crate::memory::release_free_heap();
        tracing::info!(
            bundle = %bundle.dir().display(),
            fp8_weights = model.fp8_weights,
            context = text.context_length(),
            "model loaded"
        );
        Ok(Arc::new(Engine {
            bundle,
            model,
            text,
        }))
    }

    /// The text side this engine generates with.
    pub fn text(&self) -> &Arc<TextSide> {
        &self.text
    }

    /// The text side's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.text.tokenizer()
    }

    pub fn manifest(&self) -> &Manifest {
        self.bundle.manifest()
    }

    /// The text side's description of the weights' storage.
    pub fn quantization(&self) -> String {
        self.text.quantization()
    }

    /// A conversation: generation with sampling, text and stop strings.
    pub fn new_conversation(self: &Arc<Self>) -> Result<Conversation, EngineError> {
        Ok(Conversation {
            engine: self.clone(),
            sequence: self.new_sequence()?,
        })
    }

    /// A bare token sequence, without sampling or text: for benchmarks and numerical checks
    /// that feed token ids and read logits.
    pub fn new_sequence(&self) -> Result<Sequence, EngineError> {
        let arch = &self.manifest().architecture;
        Ok(Sequence::new(
            self.model.clone(),
            arch.context_length,
            arch.vocab_size,
        )?)
    }
}

fn open(dir: &Path, options: &EngineOptions) -> Result<Bundle, EngineError> {
    if let Some(threads) = options.threads {
        set_threads(threads)?;
    }
    let bundle = Bundle::open(dir)?;
    if options.verify_hashes {
        bundle.verify_hashes()?;
    }
    Ok(bundle)
}

/// Sizes the kernels' thread pool. It can be set once per process; a later different request
/// is refused rather than silently ignored.
fn set_threads(threads: usize) -> Result<(), EngineError> {
    if threads == 0 {
        return Err(EngineError::Threads {
            threads,
            message: "must be at least 1".into(),
        });
    }
    crate::kernels::pool::set_threads(threads).map_err(|e| EngineError::Threads {
        threads,
        message: e.to_string(),
    })
}

/// One conversation's state: its KV cache and the tokens it holds. A new request whose
/// prompt starts with those tokens reuses their KV entries.
pub struct Conversation {
    engine: Arc<Engine>,
    sequence: Sequence,
}

impl Conversation {
    /// Runs one generation. `should_stop` is polled before every token and ends the
    /// generation with the reason it returns; `on_text` receives text pieces that are always
    /// whole UTF-8 and never contain (part of) a stop string. A request's constraint masks the
    /// logits before the sampler sees them, and ends the generation (`Stop`) once its match is
    /// complete.
    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        should_stop: &dyn Fn() -> Option<EndReason>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutcome, EngineError> {
        let prompt = request.prompt();
        let context_length = self.sequence.context_length();
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let side = &self.engine.text;
        let mut sampler = Sampler::new(request.sampling().clone())?;
        sampler.observe(prompt);
        let mut text = TextStream::new(side.tokenizer(), prompt, request.stop().iter().cloned());
        let mut constraint = request.constraint().cloned();

        let prefill_start = Instant::now();
        let reused = self.sequence.reuse_prefix(prompt)?;
        let mut logits = self.sequence.feed(&prompt[reused..])?;
        let prefill_s = prefill_start.elapsed().as_secs_f64();

        let decode_start = Instant::now();
        let mut tokens = Vec::new();
        let mut steps = 0;
        let mut stop_string = false;
        let reason = loop {
            if let Some(reason) = should_stop() {
                break reason;
            }
            if tokens.len() >= request.max_tokens() {
                break EndReason::Length;
            }
            if let Some(constraint) = &mut constraint {
                constraint.mask(&mut logits)?;
            }
            let id = sampler.sample(&logits)?;
            tokens.push(id);
            if side.is_eos(id) {
                break EndReason::Stop;
            }
            let complete = match &mut constraint {
                Some(constraint) => constraint.commit(id)?,
                None => false,
            };
            let piece = text.push(id)?;
            if !piece.text.is_empty() {
                on_text(&piece.text);
            }
            if piece.stopped {
                stop_string = true;
                break EndReason::Stop;
            }
            if complete {
                break EndReason::Stop;
            }
            if tokens.len() >= request.max_tokens() {
                break EndReason::Length;
            }
            if self.sequence.cached().len() >= context_length {
                break EndReason::Length;
            }
            logits = self.sequence.feed(&[id])?;
            steps += 1;
        };
        if !stop_string {
            let tail = text.finish()?;
            if !tail.is_empty() {
                on_text(&tail);
            }
        }
        let decode_s = decode_start.elapsed().as_secs_f64();
        let fed = prompt.len() - reused;
        Ok(GenerationOutcome {
            reason,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            generated_tokens: tokens.len(),
            tokens,
            prefill_tokens_per_s: rate(fed, prefill_s),
            decode_tokens_per_s: rate(steps, decode_s),
            constraint_s_per_token: constraint.map(|c| c.cost_per_token().as_secs_f64()),
        })
    }
}

fn rate(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}
