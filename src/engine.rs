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
use crate::sequence::{Lanes, Sequence, SequenceError};
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
    /// The context to run with, up to the bundle's maximum; `None` is the bundle's default.
    pub context: Option<usize>,
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
    #[error(
        "{lanes} parallel requests need {need_mib} MiB of KV cache for {model} ({lane_mib} MiB \
         each at its context of {context} tokens), more than the budget of {budget_mib} MiB: \
         lower `parallel` or raise `kv_memory_mib`"
    )]
    KvBudget {
        model: String,
        lanes: usize,
        lane_mib: u64,
        need_mib: u64,
        budget_mib: u64,
        context: usize,
    },
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
        let text = Arc::new(TextSide::load(&bundle, options.context)?);
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
        let context = text.context_length();
        let model = Arc::new(Model::load_with_context(&bundle, logits, context)?);
        // Parsing and optimising the graph leaves megabytes of freed protobuf and tract
        // intermediates on the heap.
        crate::memory::release_free_heap();
        tracing::info!(
            bundle = %bundle.dir().display(),
            fp8_weights = model.fp8_weights,
            context,
            max_context = bundle.manifest().architecture.max_context(),
            kv_cache_mib = kv_cache_bytes(&bundle.manifest().architecture, context) >> 20,
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
            self.text.context_length(),
            arch.vocab_size,
        )?)
    }
}

/// The keys and values of one conversation whose context is full: what a chosen context costs
/// in memory (resident as it fills; f32 elements).
pub fn kv_cache_bytes(arch: &marengo_bundle::manifest::Architecture, context: usize) -> u64 {
    let per_position = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * size_of::<f32>();
    (per_position * context) as u64
}

impl Engine {
    /// The KV cache of one sequence at the chosen context, in bytes: what a lane may come to
    /// hold (its mapping is resident only as far as it is written).
    pub fn kv_bytes_per_lane(&self) -> u64 {
        kv_cache_bytes(&self.manifest().architecture, self.text.context_length())
    }

    /// `count` token sequences that decode together, one forward pass for all of them.
    pub fn new_lanes(&self, count: usize) -> Result<Lanes, EngineError> {
        Ok(Lanes::new(
            self.model.clone(),
            count,
            self.text.context_length(),
            self.manifest().architecture.vocab_size,
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
    /// The engine this conversation's KV cache belongs to.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

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
        let mut generation = Generation::new(self.engine.text(), request)?;
        let reused = self.sequence.reuse_prefix(request.prompt())?;
        let mut logits = self.sequence.feed(&request.prompt()[reused..])?;
        generation.prefilled(reused);
        loop {
            let cached = self.sequence.cached().len();
            match generation.advance(&mut logits, cached, should_stop(), on_text)? {
                Step::Feed(id) => logits = self.sequence.feed(&[id])?,
                Step::End => return generation.finish(on_text),
            }
        }
    }
}

/// What a generation asks for after choosing from a position's logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Feed this token and come back with the logits that follow it.
    Feed(u32),
    /// The generation has ended; [`Generation::finish`] gives its outcome.
    End,
}

/// One request's generation, one token at a time: sampling, the constraint, the text and its
/// stop strings, and the reason it ends. It holds no KV cache: whoever runs it feeds the
/// prompt and every token it asks for, alone ([`Conversation::generate`]) or in a batch with
/// others (the scheduler).
pub struct Generation {
    text: Arc<TextSide>,
    sampler: Sampler,
    stream: TextStream,
    constraint: Option<crate::constraint::Constraint>,
    max_tokens: usize,
    context_length: usize,
    prompt_tokens: usize,
    reused: usize,
    tokens: Vec<u32>,
    /// Tokens fed after the prompt (decode steps).
    steps: usize,
    stop_string: bool,
    reason: Option<EndReason>,
    started: Instant,
    prefill_s: f64,
    decode_started: Instant,
}

impl Generation {
    /// Starts a generation of `request` on the model whose text side is `text`; its prompt
    /// is fed from the moment this is made.
    pub fn new(text: &Arc<TextSide>, request: &GenerateRequest) -> Result<Self, EngineError> {
        let prompt = request.prompt();
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let mut sampler = Sampler::new(request.sampling().clone())?;
        sampler.observe(prompt);
        let now = Instant::now();
        Ok(Generation {
            text: Arc::clone(text),
            sampler,
            stream: TextStream::new(text.tokenizer(), prompt, request.stop().iter().cloned()),
            constraint: request.constraint().cloned(),
            max_tokens: request.max_tokens(),
            context_length: text.context_length(),
            prompt_tokens: prompt.len(),
            reused: 0,
            tokens: Vec::new(),
            steps: 0,
            stop_string: false,
            reason: None,
            started: now,
            prefill_s: 0.0,
            decode_started: now,
        })
    }

    /// The prompt has been fed, `reused` of its tokens from a cache that held them.
    pub fn prefilled(&mut self, reused: usize) {
        self.reused = reused;
        self.prefill_s = self.started.elapsed().as_secs_f64();
        self.decode_started = Instant::now();
    }

    /// Chooses the next token from the `logits` after the last token fed (`cached` tokens are
    /// now in the cache), unless `stop` (a cancel, a departure, a shutdown) or the request's
    /// own end says otherwise. Text that the token completes goes to `on_text`.
    pub fn advance(
        &mut self,
        logits: &mut [f32],
        cached: usize,
        stop: Option<EndReason>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Step, EngineError> {
        if self.reason.is_some() {
            return Ok(Step::End);
        }
        if !self.tokens.is_empty() {
            self.steps += 1;
        }
        let reason = self.choose(logits, cached, stop, on_text)?;
        match reason {
            Ok(id) => Ok(Step::Feed(id)),
            Err(reason) => {
                self.reason = Some(reason);
                Ok(Step::End)
            }
        }
    }

    fn choose(
        &mut self,
        logits: &mut [f32],
        cached: usize,
        stop: Option<EndReason>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Result<u32, EndReason>, EngineError> {
        if let Some(reason) = stop {
            return Ok(Err(reason));
        }
        if self.tokens.len() >= self.max_tokens {
            return Ok(Err(EndReason::Length));
        }
        if let Some(constraint) = &mut self.constraint {
            constraint.mask(logits)?;
        }
        let id = self.sampler.sample(logits)?;
        self.tokens.push(id);
        if self.text.is_eos(id) {
            return Ok(Err(EndReason::Stop));
        }
        let complete = match &mut self.constraint {
            Some(constraint) => constraint.commit(id)?,
            None => false,
        };
        let piece = self.stream.push(id)?;
        if !piece.text.is_empty() {
            on_text(&piece.text);
        }
        if piece.stopped {
            self.stop_string = true;
            return Ok(Err(EndReason::Stop));
        }
        if complete {
            return Ok(Err(EndReason::Stop));
        }
        if self.tokens.len() >= self.max_tokens || cached >= self.context_length {
            return Ok(Err(EndReason::Length));
        }
        Ok(Ok(id))
    }

    /// The outcome of an ended generation; the text held back (a possible start of a stop
    /// string that never completed) goes to `on_text`.
    pub fn finish(
        mut self,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutcome, EngineError> {
        if !self.stop_string {
            let tail = self.stream.finish()?;
            if !tail.is_empty() {
                on_text(&tail);
            }
        }
        let decode_s = self.decode_started.elapsed().as_secs_f64();
        let fed = self.prompt_tokens - self.reused;
        Ok(GenerationOutcome {
            reason: self.reason.unwrap_or(EndReason::Error),
            prompt_tokens: self.prompt_tokens,
            reused_tokens: self.reused,
            generated_tokens: self.tokens.len(),
            tokens: self.tokens,
            prefill_tokens_per_s: rate(fed, self.prefill_s),
            decode_tokens_per_s: rate(self.steps, decode_s),
            constraint_s_per_token: self.constraint.map(|c| c.cost_per_token().as_secs_f64()),
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
