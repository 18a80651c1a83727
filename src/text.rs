//! The text side of a model: its tokenizer, chat template and manifest.
//!
//! Everything a caller can ask without running the model — tokenizing, detokenizing, the
//! model's name and context, preparing a request — lives here and never touches the weights.
//! It is loaded once at start and kept for the daemon's lifetime, while the weights side
//! ([`crate::engine::Engine`]) may be unmapped when idle: a `Tokenize` or a property read
//! after an idle unload must not map gigabytes again.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use marengo_bundle::Bundle;
use marengo_bundle::architecture::ContextError;
use marengo_bundle::manifest::{Manifest, TOKENIZER_FILE};

use crate::chat::{ChatError, ChatTemplate};
use crate::constraint::{Compiler, Constraint, ConstraintError, ConstraintSpec};
use crate::models::{model_name, quantization_name};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Context(#[from] ContextError),
}

/// A bundle's tokenizer, chat template and manifest; shared with `Arc`.
#[derive(Debug)]
pub struct TextSide {
    manifest: Manifest,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    name: String,
    /// The context this run gives the model: chosen at start, up to the bundle's maximum.
    context_length: usize,
    /// Made by the first constrained request: most daemons never need it.
    compiler: OnceLock<Result<Compiler, ConstraintError>>,
    /// The bundle directory, from which the weights side is loaded when it is needed.
    dir: PathBuf,
}

impl TextSide {
    /// Reads the text side of an opened bundle, for a run of the `context` asked for (the
    /// bundle's default when `None`); it keeps nothing of the bundle's mapping.
    pub fn load(bundle: &Bundle, context: Option<usize>) -> Result<TextSide, TextError> {
        let context_length = bundle.manifest().architecture.run_context(context)?;
        let tokenizer = Tokenizer::from_file(&bundle.dir().join(TOKENIZER_FILE))?;
        let manifest = bundle.manifest().clone();
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
        if tokenizer.min_tokens(0).is_none() {
            tracing::warn!(
                "this tokenizer's pipeline gives no bound on the tokens of a text from its \
                 length: over-long prompts are tokenized whole before they are refused"
            );
        }
        let name = model_name(bundle.dir(), &manifest);
        Ok(TextSide {
            manifest,
            tokenizer,
            chat_template,
            name,
            context_length,
            compiler: OnceLock::new(),
            dir: bundle.dir().to_owned(),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model's own chat template, when the bundle has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The most tokens, prompt and generated, one conversation can hold.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Human-readable model name: the bundle directory's name.
    pub fn model_name(&self) -> &str {
        &self.name
    }

    /// The bundle directory this text side was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `fp8_e4m3fn`, `f16` or `f32` (with the block size when blocked).
    pub fn quantization(&self) -> String {
        quantization_name(&self.manifest)
    }

    /// Compiles a structured-output constraint for this model's vocabulary.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        let compiler = self.compiler.get_or_init(|| {
            let eos = self.manifest.special_tokens.eos.first().copied();
            let eos = eos.ok_or_else(|| {
                ConstraintError::Vocabulary("the bundle names no end-of-sequence token".into())
            })?;
            let start = std::time::Instant::now();
            let compiler =
                Compiler::new(&self.tokenizer, self.manifest.architecture.vocab_size, eos)?;
            // Reading the tokenizer's JSON for the trie leaves megabytes of freed values.
            crate::memory::release_free_heap();
            tracing::info!(
                seconds = start.elapsed().as_secs_f64(),
                "structured output: token trie and parser tables built"
            );
            Ok(compiler)
        });
        compiler.as_ref().map_err(Clone::clone)?.compile(spec)
    }

    /// Whether generation ends at `id`.
    pub fn is_eos(&self, id: u32) -> bool {
        self.manifest.special_tokens.eos.contains(&id)
    }
}
