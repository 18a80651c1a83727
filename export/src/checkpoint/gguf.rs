//! A llama-architecture GGUF file as a [`CheckpointSource`]: tensors renamed to HuggingFace's
//! names and shapes, dequantized one at a time, and the model configuration and tokenizer rebuilt
//! from the metadata.
//!
//! llama.cpp's converter reorders the rows of every head of `q_proj` and `k_proj` so that its
//! rotary embedding can rotate adjacent pairs `(x[2i], x[2i+1])`; HuggingFace (and the exported
//! graph, `RotaryEmbedding` with `interleaved=0`) rotates the halves `(x[i], x[i+d/2])`. Within a
//! head of `d` rows, HF row `h·(d/2) + j` is stored as GGUF row `2j + h`; [`unpermute_rows`]
//! puts the rows back, or the model computes attention with scrambled positions.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use marengo_bundle::architecture::ArchitectureField;
use marengo_bundle::manifest::{Architecture, RopeScaling};
use sha2::{Digest, Sha256};

use super::{
    CheckpointError, CheckpointSource, ConfigError, ModelConfig, SourceDigest, SourceDtype,
    SourceTensor, TensorBytes, TokenizerFiles,
};
use crate::gguf::tokenizer::{GgufTokenizer, TokenizerError};
use crate::gguf::{GgmlType, GgufError, GgufFile, GgufIndex, TensorInfo, Value};
use marengo_bundle::layout as hf_layout;

/// Why a GGUF file cannot be read as a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum GgufSourceError {
    #[error(transparent)]
    File(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        source: TokenizerError,
    },
    #[error("{path}: tensor {tensor:?} has no HuggingFace counterpart in a llama model")]
    UnexpectedTensor { path: PathBuf, tensor: String },
    #[error(
        "{path}: tensor {tensor:?} is a bias, which `general.architecture` = {architecture} does not have (supported: weights only)"
    )]
    UnexpectedBias {
        path: PathBuf,
        tensor: String,
        architecture: String,
    },
    #[error("{path}: tensor {tensor:?} has shape {found:?}, the metadata implies {expected:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("cannot write the rebuilt tokenizer.json to {path}: {source}")]
    WriteTokenizer {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a GGUF tensor becomes its HF counterpart.
#[derive(Debug, Clone)]
struct Mapping {
    hf_name: String,
    gguf: TensorInfo,
    /// Heads whose rows llama.cpp interleaved (q: all heads, k: KV heads).
    unpermute_heads: Option<usize>,
}

/// A GGUF checkpoint, mapped and indexed; tensors are read on demand.
pub struct GgufCheckpoint {
    file: GgufFile,
    config: ModelConfig,
    /// In file order.
    tensors: Vec<Mapping>,
    tokenizer: GgufTokenizer,
    /// Holds the rebuilt `tokenizer.json` for as long as the source lives.
    tokenizer_dir: tempfile::TempDir,
}

impl GgufCheckpoint {
    /// Maps `path`, validates its metadata and tensor shapes, and rebuilds its tokenizer.
    pub fn open(path: &Path) -> Result<Self, GgufSourceError> {
        let file = GgufFile::open(path)?;
        let mut config = model_config(path, file.index())?;
        if let Some(divisors) = rope_divisors(path, &file, &config.architecture)? {
            config.architecture.rope_scaling = Some(RopeScaling::Divisors { divisors });
        }
        let tensors = map_tensors(path, file.index(), &config.architecture)?;
        let tokenizer = GgufTokenizer::from_metadata(&file.index().metadata).map_err(|source| {
            GgufSourceError::Tokenizer {
                path: path.to_owned(),
                source,
            }
        })?;
        let tokenizer_dir =
            tempfile::tempdir().map_err(|source| GgufSourceError::WriteTokenizer {
                path: std::env::temp_dir(),
                source,
            })?;
        let json_path = tokenizer_dir.path().join("tokenizer.json");
        std::fs::write(&json_path, &tokenizer.json).map_err(|source| {
            GgufSourceError::WriteTokenizer {
                path: json_path.clone(),
                source,
            }
        })?;
        tracing::info!(
            path = %path.display(),
            tensors = tensors.len(),
            layers = config.architecture.num_layers,
            "GGUF checkpoint indexed"
        );
        Ok(GgufCheckpoint {
            file,
            config,
            tensors,
            tokenizer,
            tokenizer_dir,
        })
    }

    fn mapping(&self, hf_name: &str) -> Option<&Mapping> {
        self.tensors.iter().find(|m| m.hf_name == hf_name)
    }

    fn read(&self, m: &Mapping) -> Result<SourceTensor<'_>, GgufSourceError> {
        let info = &m.gguf;
        let shape = info.shape();
        let plain = match info.ty {
            GgmlType::F32 => Some(SourceDtype::F32),
            GgmlType::F16 => Some(SourceDtype::F16),
            GgmlType::Bf16 => Some(SourceDtype::Bf16),
            _ => None,
        };
        let (dtype, bytes) = match (plain, m.unpermute_heads) {
            (Some(dtype), None) => (dtype, Cow::Borrowed(self.file.raw(info))),
            (Some(dtype), Some(heads)) => {
                let row = shape[1] * dtype.size();
                (
                    dtype,
                    Cow::Owned(unpermute_rows(self.file.raw(info), row, heads)),
                )
            }
            (None, heads) => {
                let values = self.file.dequantize(info)?;
                let mut bytes = Vec::with_capacity(values.len() * 4);
                for v in values {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                let bytes = match heads {
                    Some(heads) => unpermute_rows(&bytes, shape[1] * 4, heads),
                    None => bytes,
                };
                (SourceDtype::F32, Cow::Owned(bytes))
            }
        };
        Ok(SourceTensor {
            name: m.hf_name.clone(),
            dtype,
            shape,
            bytes: TensorBytes::Owned(bytes),
            file: self.file.path().to_owned(),
        })
    }
}

impl CheckpointSource for GgufCheckpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor_names(&self) -> Vec<String> {
        self.tensors.iter().map(|m| m.hf_name.clone()).collect()
    }

    fn tensor(&self, name: &str) -> Result<SourceTensor<'_>, CheckpointError> {
        let m = self
            .mapping(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_owned(),
                file: Some(self.file.path().to_owned()),
            })?;
        Ok(self.read(m)?)
    }

    fn tokenizer(&self) -> Result<TokenizerFiles, CheckpointError> {
        let special = &self.tokenizer.special;
        Ok(TokenizerFiles {
            tokenizer_json: Some(self.tokenizer_dir.path().join("tokenizer.json")),
            chat_template: self.tokenizer.chat_template.clone(),
            bos: special.bos,
            eos: self.tokenizer.stop_ids(),
            pad: special.pad,
            unk: special.unk,
        })
    }

    fn digests(&self) -> Result<Vec<SourceDigest>, CheckpointError> {
        let bytes = self.file.bytes();
        Ok(vec![SourceDigest {
            path: self.file.path().to_owned(),
            size: bytes.len() as u64,
            sha256: format!("{:x}", Sha256::digest(bytes)),
        }])
    }

    fn total_tensor_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|m| {
                let size = match m.gguf.ty {
                    GgmlType::F16 | GgmlType::Bf16 => 2,
                    _ => 4,
                };
                m.gguf.elements() as u64 * size
            })
            .sum()
    }
}

/// llama.cpp's tensor of per-frequency rotary divisors, Llama 3's rope scaling precomputed.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The divisors of [`ROPE_FREQS`], one per rotary frequency, when the file has them.
fn rope_divisors(
    path: &Path,
    file: &GgufFile,
    arch: &Architecture,
) -> Result<Option<Vec<f64>>, GgufSourceError> {
    let Some(info) = file.index().tensor(ROPE_FREQS) else {
        return Ok(None);
    };
    let expected = vec![arch.head_dim / 2];
    if info.shape() != expected {
        return Err(GgufSourceError::Shape {
            path: path.to_owned(),
            tensor: ROPE_FREQS.to_owned(),
            found: info.shape(),
            expected,
        });
    }
    let divisors: Vec<f64> = file.dequantize(info)?.into_iter().map(f64::from).collect();
    if let Some(bad) = divisors.iter().find(|d| !(d.is_finite() && **d > 0.0)) {
        return Err(ConfigError::Unsupported {
            path: path.to_owned(),
            key: ROPE_FREQS.to_owned(),
            value: format!("a divisor of {bad}"),
            why: "supported: positive divisors",
        }
        .into());
    }
    Ok(Some(divisors))
}

/// Puts back the rows llama.cpp interleaved: `data` is `heads` groups of `d` rows of
/// `row_bytes` each; GGUF row `2j + h` of a group becomes row `h·(d/2) + j`.
pub fn unpermute_rows(data: &[u8], row_bytes: usize, heads: usize) -> Vec<u8> {
    let rows = data.len() / row_bytes;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0u8; data.len()];
    for head in 0..heads {
        for h in 0..2 {
            for j in 0..half {
                let src = (head * d + 2 * j + h) * row_bytes;
                let dst = (head * d + h * half + j) * row_bytes;
                out[dst..dst + row_bytes].copy_from_slice(&data[src..src + row_bytes]);
            }
        }
    }
    out
}

/// The HF name and unpermutation of a `llama` or `qwen2` GGUF tensor name, or `None` for names
/// such a model does not have.
fn hf_name(gguf: &str, arch: &Architecture) -> Option<(String, Option<usize>)> {
    let global = match gguf {
        "token_embd.weight" => Some(hf_layout::EMBEDDING),
        "output_norm.weight" => Some(hf_layout::FINAL_NORM),
        "output.weight" => Some(hf_layout::LM_HEAD),
        _ => None,
    };
    if let Some(name) = global {
        return Some((name.to_owned(), None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if let Some(module) = module.strip_suffix(".bias") {
        let module = match module {
            "attn_q" if arch.attention_bias => "self_attn.q_proj",
            "attn_k" if arch.attention_bias => "self_attn.k_proj",
            "attn_v" if arch.attention_bias => "self_attn.v_proj",
            _ => return None,
        };
        return Some((hf_layout::layer_bias(layer, module), None));
    }
    // llama.cpp interleaves q and k for the `llama` architecture only; `qwen2` keeps
    // HuggingFace's halves (its "NEOX" rotary embedding).
    let permuted = arch.family == "llama";
    let (module, heads) = match module.strip_suffix(".weight")? {
        "attn_norm" => ("input_layernorm", None),
        "attn_q" => ("self_attn.q_proj", permuted.then_some(arch.num_heads)),
        "attn_k" => ("self_attn.k_proj", permuted.then_some(arch.num_kv_heads)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((hf_layout::layer_tensor(layer, module), heads))
}

/// Maps every tensor of the file, checking each against the shape the configuration implies
/// and that none is missing.
fn map_tensors(
    path: &Path,
    index: &GgufIndex,
    arch: &Architecture,
) -> Result<Vec<Mapping>, GgufSourceError> {
    let expected = hf_layout::expected_tensors(arch);
    let mut out = Vec::with_capacity(index.tensors.len());
    for info in index.tensors.iter().filter(|t| t.name != ROPE_FREQS) {
        let (hf, unpermute_heads) = hf_name(&info.name, arch).ok_or_else(|| {
            if info.name.ends_with(".bias") {
                GgufSourceError::UnexpectedBias {
                    path: path.to_owned(),
                    tensor: info.name.clone(),
                    architecture: arch.family.clone(),
                }
            } else {
                GgufSourceError::UnexpectedTensor {
                    path: path.to_owned(),
                    tensor: info.name.clone(),
                }
            }
        })?;
        let want = expected.iter().find(|e| e.name == hf).ok_or_else(|| {
            GgufSourceError::UnexpectedTensor {
                path: path.to_owned(),
                tensor: info.name.clone(),
            }
        })?;
        if info.shape() != want.shape {
            return Err(GgufSourceError::Shape {
                path: path.to_owned(),
                tensor: info.name.clone(),
                found: info.shape(),
                expected: want.shape.clone(),
            });
        }
        out.push(Mapping {
            hf_name: hf,
            gguf: info.clone(),
            unpermute_heads,
        });
    }
    if let Some(missing) = expected
        .iter()
        .find(|e| !out.iter().any(|m| m.hf_name == e.name))
    {
        return Err(GgufError::MissingTensor {
            path: path.to_owned(),
            tensor: missing.name.clone(),
        }
        .into());
    }
    Ok(out)
}

/// The metadata key an architecture field is read from, after `{general.architecture}.`.
fn gguf_key_suffix(field: ArchitectureField) -> &'static str {
    match field {
        ArchitectureField::HiddenSize => "embedding_length",
        ArchitectureField::NumLayers => "block_count",
        ArchitectureField::NumHeads => "attention.head_count",
        ArchitectureField::NumKvHeads => "attention.head_count_kv",
        ArchitectureField::HeadDim => "attention.key_length",
        ArchitectureField::IntermediateSize => "feed_forward_length",
        ArchitectureField::VocabSize => "vocab_size",
        ArchitectureField::ContextLength | ArchitectureField::MaxContextLength => "context_length",
        ArchitectureField::SlidingWindow => "attention.sliding_window",
    }
}

/// The model configuration from `{arch}.*` metadata.
fn model_config(path: &Path, index: &GgufIndex) -> Result<ModelConfig, ConfigError> {
    let meta = Meta { path, index };
    let arch = meta
        .string("general.architecture")?
        .ok_or_else(|| meta.missing("general.architecture"))?;
    let attention_bias = match arch {
        "llama" => false,
        "qwen2" => true,
        other => {
            return Err(meta.unsupported(
                "general.architecture",
                other.to_owned(),
                "supported: llama (Llama, Mistral, SmolLM), qwen2",
            ));
        }
    };
    let key = |suffix: &str| format!("{arch}.{suffix}");
    let required = |key: &str| -> Result<usize, ConfigError> {
        meta.uint(key)?.ok_or_else(|| meta.missing(key))
    };
    let hidden_size = required(&key("embedding_length"))?;
    let num_layers = required(&key("block_count"))?;
    let intermediate_size = required(&key("feed_forward_length"))?;
    let num_heads = required(&key("attention.head_count"))?;
    let context_length = required(&key("context_length"))?;
    // The standard key, which llama.cpp's converter writes for the families it runs with a
    // window (Gemma 2, Cohere 2…) but not for llama-architecture Mistrals: those run with
    // full attention, as llama.cpp runs them.
    let sliding_window = meta.uint(&key("attention.sliding_window"))?;
    let num_kv_heads = meta
        .uint(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    let head_dim = match meta.uint(&key("attention.key_length"))? {
        Some(d) => d,
        None => match hidden_size.checked_rem(num_heads) {
            Some(0) => hidden_size / num_heads,
            Some(_) => {
                return Err(meta.unsupported(
                    &key("attention.head_count"),
                    num_heads.to_string(),
                    "must divide llama.embedding_length when llama.attention.key_length is absent",
                ));
            }
            // No heads: `validate` below refuses llama.attention.head_count = 0.
            None => 0,
        },
    };
    if let Some(v) = meta.uint(&key("attention.value_length"))?
        && v != head_dim
    {
        return Err(meta.unsupported(
            &key("attention.value_length"),
            v.to_string(),
            "must equal the key length",
        ));
    }
    if let Some(rope_dims) = meta.uint(&key("rope.dimension_count"))?
        && rope_dims != head_dim
    {
        return Err(meta.unsupported(
            &key("rope.dimension_count"),
            rope_dims.to_string(),
            "supported: llama.attention.key_length, a rotary embedding over the whole head",
        ));
    }
    // Llama 3's scaling comes as the `rope_freqs.weight` tensor, read with the tensors.
    let rope_scaling = match meta.string(&key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => {
            let factor = meta
                .float(&key("rope.scaling.factor"))?
                .ok_or_else(|| meta.missing(&key("rope.scaling.factor")))?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(meta.unsupported(
                    &key("rope.scaling.factor"),
                    factor.to_string(),
                    "supported: a positive number",
                ));
            }
            Some(RopeScaling::Linear { factor })
        }
        Some(kind) => {
            return Err(meta.unsupported(
                &key("rope.scaling.type"),
                kind.to_owned(),
                "supported: none, linear; Llama 3's scaling as rope_freqs.weight",
            ));
        }
    };
    if let Some(experts) = meta.uint(&key("expert_count"))?
        && experts > 0
    {
        return Err(meta.unsupported(
            &key("expert_count"),
            experts.to_string(),
            "supported: 0, mixture-of-experts models are not exported",
        ));
    }
    let rope_theta = meta.float(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let rms_norm_eps = meta
        .float(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| meta.missing(&key("attention.layer_norm_rms_epsilon")))?;
    let vocab_size = match meta.uint(&key("vocab_size"))? {
        Some(v) => v,
        None => index
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|a| a.len())
            .ok_or_else(|| meta.missing(&key("vocab_size")))?,
    };
    let token_id = |key| {
        meta.uint(key)
            .map(|v| v.and_then(|v| u32::try_from(v).ok()))
    };

    let architecture = Architecture {
        family: arch.to_owned(),
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size,
        vocab_size,
        rope_theta,
        rms_norm_eps,
        tie_word_embeddings: index.tensor("output.weight").is_none(),
        context_length,
        max_context_length: Some(context_length),
        sliding_window,
        rope_scaling,
        attention_bias,
    };
    architecture
        .validate()
        .map_err(|e| ConfigError::architecture(path, |f| key(gguf_key_suffix(f)), e))?;
    Ok(ModelConfig {
        architecture,
        dtype: None,
        max_position_embeddings: context_length,
        sliding_window,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: token_id("tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect(),
        pad_token_id: token_id("tokenizer.ggml.padding_token_id")?,
    })
}

/// Typed metadata lookups whose errors name the file and key.
struct Meta<'a> {
    path: &'a Path,
    index: &'a GgufIndex,
}

impl Meta<'_> {
    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::Missing {
            path: self.path.to_owned(),
            key: key.to_owned(),
        }
    }

    fn unsupported(&self, key: &str, value: String, why: &'static str) -> ConfigError {
        ConfigError::Unsupported {
            path: self.path.to_owned(),
            key: key.to_owned(),
            value,
            why,
        }
    }

    fn wrong_type(&self, key: &str, value: &Value, expected: &'static str) -> ConfigError {
        self.unsupported(key, format!("a {}", value.type_name()), expected)
    }

    fn uint(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        self.index
            .get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.wrong_type(key, v, "must be an unsigned integer"))
            })
            .transpose()
    }

    fn float(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        self.index
            .get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.wrong_type(key, v, "must be a number"))
            })
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        self.index
            .get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, v, "must be a string"))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies llama.cpp's permutation (`reshape(heads, 2, d/2, k).swapaxes(1, 2)`) to row
    /// indices, independently of [`unpermute_rows`].
    fn permute_like_llama_cpp(rows: &[u32], heads: usize) -> Vec<u32> {
        let d = rows.len() / heads;
        let half = d / 2;
        let mut out = Vec::with_capacity(rows.len());
        for head in 0..heads {
            for j in 0..half {
                for h in 0..2 {
                    out.push(rows[head * d + h * half + j]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        for (rows, heads) in [(8usize, 1usize), (12, 3), (64, 4)] {
            let hf: Vec<u32> = (0..rows as u32).collect();
            let gguf = permute_like_llama_cpp(&hf, heads);
            assert_ne!(
                gguf, hf,
                "the permutation must move rows for this test to mean much"
            );
            let bytes: Vec<u8> = gguf.iter().flat_map(|r| r.to_le_bytes()).collect();
            let back = unpermute_rows(&bytes, 4, heads);
            let back: Vec<u32> = back
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(back, hf, "rows {rows} heads {heads}");
        }
    }

    #[test]
    fn llama_names_map_to_hf() {
        let arch = Architecture {
            family: "llama".into(),
            hidden_size: 8,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 2,
            intermediate_size: 16,
            vocab_size: 10,
            rope_theta: 1e4,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            context_length: 16,
            max_context_length: None,
            sliding_window: None,
            rope_scaling: None,
            attention_bias: false,
        };
        assert_eq!(
            hf_name("blk.1.attn_k.weight", &arch),
            Some(("model.layers.1.self_attn.k_proj.weight".into(), Some(2)))
        );
        assert_eq!(
            hf_name("blk.0.attn_q.weight", &arch),
            Some(("model.layers.0.self_attn.q_proj.weight".into(), Some(4)))
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight", &arch),
            Some(("model.layers.0.mlp.down_proj.weight".into(), None))
        );
        assert_eq!(
            hf_name("token_embd.weight", &arch),
            Some(("model.embed_tokens.weight".into(), None))
        );
        assert_eq!(hf_name("blk.0.attn_q.bias", &arch), None);
        assert_eq!(hf_name("blk.x.attn_q.weight", &arch), None);
    }
}
