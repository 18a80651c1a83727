//! The generation API: a loaded model ([`Engine`]) and the conversations run on it
//! ([`Session`]). This is the boundary the D-Bus layer and the offline `generate` command
//! call; neither sees tract or tensors.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::chat::ChatTemplate;
use crate::model::Model;
use crate::sampler::{Sampler, SamplingParams};
use crate::session::{Session as ModelSession, SessionError};
use crate::tokenizer::{TextStream, Tokenizer};
use marengo_bundle::Bundle;
use marengo_bundle::manifest::{Manifest, QuantKind};

/// Why a generation ended, as far as the engine knows. The D-Bus layer refines
/// `Cancelled` into `cancelled`, `disconnected` or `shutdown` from its own bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The caller's `should_stop` returned true.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

/// Figures of one finished generation.
#[derive(Debug, Clone)]
pub struct GenerationOutcome {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV entries were reused from the previous request.
    pub reused_tokens: usize,
    pub generated_tokens: usize,
    /// The generated ids, the last one included even when it is an end-of-sequence token.
    pub tokens: Vec<u32>,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// Options for loading a bundle.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Worker threads for the kernels; `None` uses every core.
    pub threads: Option<usize>,
    /// Hash every file against the manifest (slow for a 7 GB bundle).
    pub verify_hashes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("prompt of {prompt_tokens} tokens does not fit the context of {context_length} tokens")]
    ContextOverflow {
        prompt_tokens: usize,
        context_length: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(transparent)]
    Bundle(#[from] marengo_bundle::BundleError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Sampling(#[from] crate::sampler::SamplingError),
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    #[error("setting up {threads} kernel threads: {message}")]
    Threads { threads: usize, message: String },
}

/// A loaded, memory-mapped model. Shared between sessions with `Arc`.
pub struct Engine {
    bundle: Bundle,
    model: Arc<Model>,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    name: String,
}

impl Engine {
    pub fn load(dir: &Path, options: &EngineOptions) -> Result<Arc<Engine>, EngineError> {
        if let Some(threads) = options.threads {
            set_threads(threads)?;
        }
        let bundle = Bundle::open(dir)?;
        if options.verify_hashes {
            bundle.verify_hashes()?;
        }
        let model = Arc::new(Model::load(&bundle)?);
        // Parsing and optimising the graph leaves megabytes of freed protobuf and tract
        // intermediates on the heap.
        crate::memory::release_free_heap();
        let tokenizer =
            Tokenizer::from_file(&bundle.dir().join(marengo_bundle::manifest::TOKENIZER_FILE))?;
        let manifest = bundle.manifest();
        let chat_template = match &manifest.chat_template {
            Some(template) => {
                let token = |id: Option<u32>| {
                    id.and_then(|id| tokenizer.id_to_token(id))
                        .unwrap_or_default()
                };
                let bos = token(manifest.special_tokens.bos);
                let eos = token(manifest.special_tokens.eos.first().copied());
                Some(ChatTemplate::new(template, &bos, &eos)?)
            }
            None => None,
        };
        let name = model_name(dir, manifest);
        tracing::info!(
            bundle = %dir.display(),
            fp8_weights = model.fp8_weights,
            context = manifest.architecture.context_length,
            "model loaded"
        );
        Ok(Arc::new(Engine {
            bundle,
            model,
            tokenizer,
            chat_template,
            name,
        }))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's own chat template, when the bundle has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn manifest(&self) -> &Manifest {
        self.bundle.manifest()
    }

    pub fn context_length(&self) -> usize {
        self.manifest().architecture.context_length
    }

    /// Human-readable model name: the bundle directory's name.
    pub fn model_name(&self) -> &str {
        &self.name
    }

    /// `fp8_e4m3fn`, `f16` or `f32` (with the block size when blocked).
    pub fn quantization(&self) -> String {
        let q = &self.manifest().quantization;
        let kind = match q.kind {
            QuantKind::Fp8E4m3fn => "fp8_e4m3fn",
            QuantKind::F16 => "f16",
            QuantKind::F32 => "f32",
        };
        match q.block_size {
            Some(b) => format!("{kind}/block{b}"),
            None => kind.to_string(),
        }
    }

    pub fn new_session(self: &Arc<Self>) -> Result<Session, EngineError> {
        let arch = &self.manifest().architecture;
        let inner = ModelSession::new(self.model.clone(), arch.context_length, arch.vocab_size)?;
        Ok(Session {
            engine: self.clone(),
            inner,
        })
    }

    /// A bare model session, without sampling or text: for benchmarks and numerical checks
    /// that feed token ids and read logits.
    pub fn new_model_session(&self) -> Result<ModelSession, EngineError> {
        let arch = &self.manifest().architecture;
        Ok(ModelSession::new(
            self.model.clone(),
            arch.context_length,
            arch.vocab_size,
        )?)
    }

    fn is_eos(&self, id: u32) -> bool {
        self.manifest().special_tokens.eos.contains(&id)
    }
}

/// Sizes the kernels' thread pool (rayon's global pool). It can be set once per process;
/// a later different request is refused rather than silently ignored.
fn set_threads(threads: usize) -> Result<(), EngineError> {
    if threads == 0 {
        return Err(EngineError::Threads {
            threads,
            message: "must be at least 1".into(),
        });
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == threads => Ok(()),
        Err(e) => Err(EngineError::Threads {
            threads,
            message: e.to_string(),
        }),
    }
}

fn model_name(dir: &Path, manifest: &Manifest) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    match dir.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => manifest.architecture.family.clone(),
    }
}

/// One conversation's state: its KV cache and the tokens it holds. A new request whose
/// prompt starts with those tokens reuses their KV entries.
pub struct Session {
    engine: Arc<Engine>,
    inner: ModelSession,
}

impl Session {
    /// Runs one generation. `should_stop` is polled before every token; `on_text` receives
    /// text pieces that are always whole UTF-8 and never contain (part of) a stop string.
    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        should_stop: &dyn Fn() -> bool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutcome, EngineError> {
        let prompt = &request.prompt;
        let context_length = self.inner.context_length();
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() >= context_length {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: prompt.len(),
                context_length,
            });
        }
        let mut sampler = Sampler::new(request.sampling.clone())?;
        sampler.observe(prompt);
        let mut text =
            TextStream::new(&self.engine.tokenizer, prompt, request.stop.iter().cloned());

        let prefill_start = Instant::now();
        let reused = self.inner.reuse_prefix(prompt)?;
        let mut logits = self.inner.feed(&prompt[reused..])?;
        let prefill_s = prefill_start.elapsed().as_secs_f64();

        let decode_start = Instant::now();
        let mut tokens = Vec::new();
        let mut steps = 0;
        let mut stop_string = false;
        let reason = loop {
            if should_stop() {
                break FinishReason::Cancelled;
            }
            if tokens.len() >= request.max_tokens {
                break FinishReason::Length;
            }
            let id = sampler.sample(&logits)?;
            tokens.push(id);
            if self.engine.is_eos(id) {
                break FinishReason::Stop;
            }
            let piece = text.push(id)?;
            if !piece.text.is_empty() {
                on_text(&piece.text);
            }
            if piece.stopped {
                stop_string = true;
                break FinishReason::Stop;
            }
            if tokens.len() >= request.max_tokens {
                break FinishReason::Length;
            }
            if self.inner.cached().len() >= context_length {
                break FinishReason::Length;
            }
            logits = self.inner.feed(&[id])?;
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
