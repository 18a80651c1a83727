//! Checkpoint readers: everything the exporter consumes comes through [`CheckpointSource`], so
//! a new input format (safetensors directories, GGUF files, a merge of two parents) plugs in
//! without the quantizer or the graph builder knowing.
//!
//! Sources hand out one tensor at a time, borrowed from a memory map where the format allows:
//! the exporter's peak memory is then one tensor's output, not the model.

pub mod config;
pub mod gguf;
pub mod hf_dir;
pub mod safetensors;

use std::borrow::Cow;
use std::ops::Deref;
use std::path::PathBuf;

use half::{bf16, f16};

pub use config::{ConfigError, ModelConfig};

/// Element type of a source tensor, as far as the exporter reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDtype {
    Bf16,
    F16,
    F32,
}

impl SourceDtype {
    /// Parses the dtype names used by `config.json` (`bfloat16`) and the CLI (`bf16`).
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "bfloat16" | "bf16" => Some(SourceDtype::Bf16),
            "float16" | "f16" | "half" => Some(SourceDtype::F16),
            "float32" | "f32" | "float" => Some(SourceDtype::F32),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SourceDtype::Bf16 | SourceDtype::F16 => 2,
            SourceDtype::F32 => 4,
        }
    }

    /// Name as `config.json` spells it.
    pub fn hf_name(self) -> &'static str {
        match self {
            SourceDtype::Bf16 => "bfloat16",
            SourceDtype::F16 => "float16",
            SourceDtype::F32 => "float32",
        }
    }

    /// Widens little-endian elements to f32 (exact for all three types).
    pub fn widen_into(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            SourceDtype::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            SourceDtype::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            SourceDtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }
}

/// Bytes of one tensor: a mapped region of a file, or a buffer a source had to compute
/// (a dequantized GGUF tensor, a merged tensor).
pub enum TensorBytes<'a> {
    Mapped(memmap2::Mmap),
    Owned(Cow<'a, [u8]>),
}

impl Deref for TensorBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            TensorBytes::Mapped(map) => map,
            TensorBytes::Owned(bytes) => bytes,
        }
    }
}

/// One tensor of a checkpoint, named as HuggingFace names it
/// (`model.layers.0.self_attn.q_proj.weight`), little-endian, row-major.
pub struct SourceTensor<'a> {
    pub name: String,
    pub dtype: SourceDtype,
    pub shape: Vec<usize>,
    pub bytes: TensorBytes<'a>,
    /// The file it was read from, for error messages.
    pub file: PathBuf,
}

/// Tokenizer and chat settings that travel with the weights.
#[derive(Debug, Clone, Default)]
pub struct TokenizerFiles {
    /// Path of a HuggingFace `tokenizer.json`.
    pub tokenizer_json: Option<PathBuf>,
    pub chat_template: Option<String>,
    pub bos: Option<u32>,
    /// The ids that end generation ([`stop_ids`]).
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
}

/// Texts of the special tokens that end a turn in the chat formats of the supported families:
/// Llama 3's `<|eot_id|>` (and 3.1's `<|eom_id|>` after a tool call), its `<|end_of_text|>`, and
/// ChatML's `<|im_end|>` (Qwen2, SmolLM2). A chat template writes one after every turn, so the
/// model ends its answer with one; a checkpoint's own list of EOS ids does not always name it
/// (the GGUFs of base models and some instruct ones give a single EOS; llama.cpp recognises the
/// same texts for the same reason).
pub const END_OF_TURN_TOKENS: [&str; 4] =
    ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>"];

/// The ids that end generation: `eos` as the checkpoint orders them (the first is the one chat
/// templates print as `eos_token`), then each special token named in [`END_OF_TURN_TOKENS`]
/// that is not among them, in id order.
pub fn stop_ids<'a>(eos: &[u32], specials: impl IntoIterator<Item = (&'a str, u32)>) -> Vec<u32> {
    let mut ids = Vec::with_capacity(eos.len());
    for &id in eos {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let mut extra: Vec<u32> = specials
        .into_iter()
        .filter(|&(text, id)| END_OF_TURN_TOKENS.contains(&text) && !ids.contains(&id))
        .map(|(_, id)| id)
        .collect();
    extra.sort_unstable();
    extra.dedup();
    ids.extend(extra);
    ids
}

/// An input file of the export and its digest, for the manifest's provenance.
#[derive(Debug, Clone)]
pub struct SourceDigest {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// Why a tensor could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufSourceError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("{path}: tensor {tensor} has unsupported dtype {dtype} (supported: BF16, F16, F32)")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("tensor {tensor} is missing from the checkpoint{}", in_file(file))]
    MissingTensor {
        tensor: String,
        file: Option<PathBuf>,
    },
}

fn in_file(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!(" (expected in {})", f.display()))
        .unwrap_or_default()
}

/// Digest of a whole input file.
pub(crate) fn file_digest(path: &std::path::Path) -> Result<SourceDigest, CheckpointError> {
    let (size, sha256) =
        marengo_bundle::digest::sha256_file(path).map_err(|source| CheckpointError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(SourceDigest {
        path: path.to_owned(),
        size,
        sha256,
    })
}

/// A checkpoint the exporter can read.
pub trait CheckpointSource {
    /// The validated model configuration.
    fn config(&self) -> &ModelConfig;

    /// Tensor names in the order reading them is cheapest (file order).
    fn tensor_names(&self) -> Vec<String>;

    /// One tensor, by HuggingFace name. Dropping it releases its mapping.
    fn tensor(&self, name: &str) -> Result<SourceTensor<'_>, CheckpointError>;

    /// Tokenizer file, chat template and special token ids.
    fn tokenizer(&self) -> Result<TokenizerFiles, CheckpointError>;

    /// Input files and their digests; called once, after every tensor was read.
    fn digests(&self) -> Result<Vec<SourceDigest>, CheckpointError>;

    /// Total bytes of tensor data, for progress reporting.
    fn total_tensor_bytes(&self) -> u64;
}

/// A checkpoint whose chat template is given by the user (`convert --chat-template FILE`):
/// for a GGUF written without `tokenizer.chat_template`, or a template fixed since. The file
/// joins the sources of the manifest's provenance.
pub struct WithChatTemplate<'a> {
    source: &'a dyn CheckpointSource,
    template: String,
    file: PathBuf,
}

impl<'a> WithChatTemplate<'a> {
    /// Reads the template from `file`.
    pub fn new(source: &'a dyn CheckpointSource, file: PathBuf) -> Result<Self, CheckpointError> {
        let template = std::fs::read_to_string(&file).map_err(|source| CheckpointError::Io {
            path: file.clone(),
            source,
        })?;
        Ok(Self {
            source,
            template,
            file,
        })
    }
}

impl CheckpointSource for WithChatTemplate<'_> {
    fn config(&self) -> &ModelConfig {
        self.source.config()
    }

    fn tensor_names(&self) -> Vec<String> {
        self.source.tensor_names()
    }

    fn tensor(&self, name: &str) -> Result<SourceTensor<'_>, CheckpointError> {
        self.source.tensor(name)
    }

    fn tokenizer(&self) -> Result<TokenizerFiles, CheckpointError> {
        Ok(TokenizerFiles {
            chat_template: Some(self.template.clone()),
            ..self.source.tokenizer()?
        })
    }

    fn digests(&self) -> Result<Vec<SourceDigest>, CheckpointError> {
        let mut digests = self.source.digests()?;
        digests.push(file_digest(&self.file)?);
        Ok(digests)
    }

    fn total_tensor_bytes(&self) -> u64 {
        self.source.total_tensor_bytes()
    }
}
