//! `bundle.json`: the schema of a bundle's manifest, shared by the exporter (which writes it)
//! and the daemon (which trusts nothing in a bundle it has not checked against it).
//!
//! Field names are the on-disk format: renaming one is a format change and needs a new
//! `format_version`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Value of [`Manifest::format`]: tells a bundle apart from any other JSON file.
pub const FORMAT: &str = "marengo-bundle";
/// The only format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's own file name.
pub const MANIFEST_FILE: &str = "bundle.json";
/// The ONNX graph, weights as external data.
pub const GRAPH_FILE: &str = "model.onnx";
/// Every initializer's bytes, each tensor page aligned.
pub const WEIGHTS_FILE: &str = "model.weights";
/// The HuggingFace `tokenizers` file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Every tensor in [`WEIGHTS_FILE`] starts at a multiple of this, so that a mapped tensor is
/// page aligned on 4 KiB-page systems and SIMD loads of it are aligned everywhere.
pub const TENSOR_ALIGNMENT: u64 = 4096;

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`FORMAT_VERSION`] for bundles this code reads.
    pub format_version: u32,
    pub architecture: Architecture,
    pub quantization: Quantization,
    /// The model's own Jinja chat template, when the checkpoint has one.
    pub chat_template: Option<String>,
    pub special_tokens: SpecialTokens,
    /// Every file of the bundle except the manifest itself, by file name.
    pub files: BTreeMap<String, FileEntry>,
    /// Every tensor in [`WEIGHTS_FILE`], in file order.
    pub tensors: Vec<TensorEntry>,
    pub provenance: Provenance,
}

/// The network's shape: what the graph was built for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// `mistral`, `llama` or `qwen2`: they share one graph, the name is for people.
    pub family: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// The context a run has when it does not choose one (prompt + generated tokens): the
    /// exporter's choice, at most 4096 by default so that the KV cache a default start
    /// reserves does not grow with the model's maximum.
    pub context_length: usize,
    /// The longest context a run may choose (`max_position_embeddings`, GGUF's
    /// `context_length`): the rotary caches cover this many positions. Absent in bundles
    /// written before the context was chosen at run time, whose caches cover
    /// `context_length` only ([`Architecture::max_context`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context_length: Option<usize>,
    /// Each query attends to the last `sliding_window` positions, itself included
    /// (transformers' `kv_idx > q_idx - sliding_window`), as Mistral-7B v0.1 was trained; absent
    /// for attention over the whole context. The graph's `Attention` does not express it (see
    /// ARCHITECTURE.md, the graph): it changes nothing while the context is at most the
    /// window, and the engine applies it past that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// The rescaling of the rotary frequencies the caches were computed with; absent for the
    /// plain `θ^(−2j/head_dim)`. Recorded for people and provenance: the graph only ever sees
    /// the caches, so a scaled model is the same standard ONNX as any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// The q, k and v projections add a bias (Qwen2), stored f32 next to their weights
    /// ([`layer_bias`](crate::layout::layer_bias)) and added after the product.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attention_bias: bool,
}

/// How a long-context model rescales its rotary frequencies `θ^(−2j/head_dim)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's: wavelengths shorter than `original_max_position_embeddings /
    /// high_freq_factor` are kept, longer than `original_max_position_embeddings /
    /// low_freq_factor` are divided by `factor`, and those between are interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// One divisor per frequency, as GGUF files store Llama 3's scaling (`rope_freqs.weight`,
    /// precomputed by llama.cpp's converter).
    Divisors { divisors: Vec<f64> },
}

/// How the linear layers, the embedding and the LM head are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantization {
    pub kind: QuantKind,
    /// FP8 only: scales per `block_size` elements along the input dimension instead of one per
    /// output channel.
    pub block_size: Option<usize>,
    /// FP8 only: the LM head (the embedding too, when tied) carries a second FP8 tensor, the
    /// rounding error of the first ([`HEAD_RESIDUAL_SUFFIX`](super::layout::HEAD_RESIDUAL_SUFFIX)),
    /// and is used as their sum. E4M3's 3-bit mantissa leaves a 2.6 % relative error that the
    /// logits feel directly; small models then change their greedy answers (SmolLM2-135M
    /// named no city for the capital of France). The sum leaves 0.06 % (SmolLM2's head),
    /// closer than 8-bit integers with block scales, from the same FP8 kernels, for one more
    /// byte per head weight.
    #[serde(default)]
    pub head_residual: bool,
}

/// Storage kind of the quantized tensors; norms and rotary caches are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantKind {
    /// FLOAT8E4M3FN weights with f32 scales.
    Fp8E4m3fn,
    F16,
    F32,
}

impl QuantKind {
    /// The element type the embedding, the linear layers and the LM head are stored in.
    pub fn stored_dtype(self) -> TensorDtype {
        match self {
            QuantKind::Fp8E4m3fn => TensorDtype::Fp8E4m3fn,
            QuantKind::F16 => TensorDtype::F16,
            QuantKind::F32 => TensorDtype::F32,
        }
    }
}

/// Element type of a tensor in [`WEIGHTS_FILE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorDtype {
    Fp8E4m3fn,
    F16,
    F32,
}

impl TensorDtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            TensorDtype::Fp8E4m3fn => 1,
            TensorDtype::F16 => 2,
            TensorDtype::F32 => 4,
        }
    }
}

/// Token ids the session and the sampler need without parsing the tokenizer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    /// Generation stops at any of these.
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
}

/// Size and digest of one bundle file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
}

/// One tensor in [`WEIGHTS_FILE`]; the graph's initializer of the same name points at the same
/// bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
    /// Byte offset in [`WEIGHTS_FILE`], a multiple of [`TENSOR_ALIGNMENT`].
    pub offset: u64,
    /// Byte length: element count × dtype size.
    pub length: u64,
    /// For a scale tensor: the name of the quantized tensor it scales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_of: Option<String>,
    /// For a quantized tensor: ‖dequantized − original‖₂ / ‖original‖₂.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rel_rms_error: Option<f64>,
}

/// Where the bundle came from, so that it can be reproduced or audited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub sources: Vec<SourceFile>,
    pub exporter_version: String,
    /// The exporter's argv.
    pub command_line: Vec<String>,
    /// Seconds since the Unix epoch (UTC) when the export finished.
    pub created: u64,
}

/// One input file of the export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}
