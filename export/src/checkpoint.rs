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
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
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
