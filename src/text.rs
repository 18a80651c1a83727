//! The text side of a model: its tokenizer, chat template and manifest.
//!
//! Everything a caller can ask without running the model — tokenizing, detokenizing, the
//! model's name and context, preparing a request — lives here and never touches the weights.
//! It is loaded once at start and kept for the daemon's lifetime, while the weights side
//! ([`crate::engine::Engine`]) may be unmapped when idle: a `Tokenize` or a property read
//! after an idle unload must not map gigabytes again.

use std::path::Path;
use std::sync::OnceLock;

use marengo_bundle::Bundle;
use marengo_bundle::manifest::{Manifest, QuantKind, TOKENIZER_FILE};

use crate::chat::{ChatError, ChatTemplate};
use crate::constraint::{Compiler, Constraint, ConstraintError, ConstraintSpec};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
}

/// A bundle's tokenizer, chat template and manifest; shared with `Arc`.
#[derive(Debug)]
pub struct TextSide {
    manifest: Manifest,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    name: String,
    /// Made by the first constrained request: most daemons never need it.
    compiler: OnceLock<Result<Compiler, ConstraintError>>,
}

impl TextSide {
    /// Reads the text side of an opened bundle; it keeps nothing of the bundle's mapping.
    pub fn load(bundle: &Bundle) -> Result<TextSide, TextError> {
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
            compiler: OnceLock::new(),
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
        self.manifest.architecture.context_length
    }

    /// Human-readable model name: the bundle directory's name.
    pub fn model_name(&self) -> &str {
        &self.name
    }

    /// `fp8_e4m3fn`, `f16` or `f32` (with the block size when blocked).
    pub fn quantization(&self) -> String {
        let q = &self.manifest.quantization;
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

    /// Compiles a structured-output constraint for this model's vocabulary.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        let compiler = self.compiler.get_or_init(|| {
            let eos = self.manifest.special_tokens.eos.first().copied();
            let eos = eos.ok_or_else(|| {
                ConstraintError::Vocabulary("the bundle names no end-of-sequence token".into())
            })?;
            Compiler::new(&self.tokenizer, self.manifest.architecture.vocab_size, eos)
        });
        compiler.as_ref().map_err(Clone::clone)?.compile(spec)
    }

    /// Whether generation ends at `id`.
    pub fn is_eos(&self, id: u32) -> bool {
        self.manifest.special_tokens.eos.contains(&id)
    }
}

fn model_name(dir: &Path, manifest: &Manifest) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    match dir.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => manifest.architecture.family.clone(),
    }
}
