//! `config.json` of a HuggingFace Mistral/Llama checkpoint, in both the transformers-4 style
//! (top-level `rope_theta`, `torch_dtype`) and the transformers-5 style (`rope_parameters`,
//! `dtype`), reduced to the few numbers the graph needs.
//!
//! Anything the graph cannot express (biases, rope scaling, another activation) is refused here,
//! by key, rather than exported into a model that silently computes something else.

use std::path::{Path, PathBuf};

use marengo_bundle::architecture::{ArchitectureError, ArchitectureField, ArchitectureRule};
use marengo_bundle::manifest::{Architecture, RopeScaling};
use serde::Deserialize;
use serde_json::Value;

use super::SourceDtype;

/// Why a `config.json` cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid config.json: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path}: key `architectures` = {found:?} is not supported (supported: {SUPPORTED_ARCHITECTURES})"
    )]
    UnsupportedArchitecture { path: PathBuf, found: String },
    #[error("{path}: key `{key}` is missing")]
    Missing { path: PathBuf, key: String },
    /// `why` says what is supported instead.
    #[error("{path}: key `{key}` = {value} is not supported ({why})")]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        why: &'static str,
    },
    /// A shape the bundle cannot hold ([`Architecture::validate`]), named by the source's key.
    #[error("{path}: key `{key}` = {value} is not supported: {rule}")]
    Architecture {
        path: PathBuf,
        key: String,
        value: usize,
        rule: ArchitectureRule,
    },
}

impl ConfigError {
    /// `error` told with the key `key_of` gives the field in the file at `path`.
    pub fn architecture(
        path: &Path,
        key_of: impl Fn(ArchitectureField) -> String,
        error: ArchitectureError,
    ) -> Self {
        ConfigError::Architecture {
            path: path.to_owned(),
            key: key_of(error.field),
            value: error.value,
            rule: error.rule,
        }
    }
}

/// The `architectures` the graph computes faithfully, as the refusal lists them.
pub const SUPPORTED_ARCHITECTURES: &str = "MistralForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM";

/// The `config.json` key of an architecture field.
fn config_key(field: ArchitectureField) -> &'static str {
    match field {
        ArchitectureField::HiddenSize => "hidden_size",
        ArchitectureField::NumLayers => "num_hidden_layers",
        ArchitectureField::NumHeads => "num_attention_heads",
        ArchitectureField::NumKvHeads => "num_key_value_heads",
        ArchitectureField::HeadDim => "head_dim",
        ArchitectureField::IntermediateSize => "intermediate_size",
        ArchitectureField::VocabSize => "vocab_size",
        ArchitectureField::ContextLength | ArchitectureField::MaxContextLength => {
            "max_position_embeddings"
        }
        ArchitectureField::SlidingWindow => "sliding_window",
    }
}

/// The part of `config.json` the exporter reads. Unknown keys are ignored on purpose: configs
/// carry many training-only fields.
#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    vocab_size: Option<usize>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<u32>,
}

/// `eos_token_id` is an int in older configs and a list in newer ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// A checkpoint's model configuration, validated.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Shape of the network; `context_length` is `max_position_embeddings` until the exporter
    /// chooses the bundle's default context.
    pub architecture: Architecture,
    /// The dtype the checkpoint says its weights are in, when it says so.
    pub dtype: Option<SourceDtype>,
    pub max_position_embeddings: usize,
    /// `None` means full attention over the whole context.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(path, &text)
    }

    /// Validates the text of a `config.json`; `path` only names it in errors.
    pub fn from_json(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let missing = |key: &str| ConfigError::Missing {
            path: path.to_owned(),
            key: key.to_owned(),
        };
        let unsupported = |key: &str, value: String, why| ConfigError::Unsupported {
            path: path.to_owned(),
            key: key.to_owned(),
            value,
            why,
        };

        let family = match raw.architectures.first().map(String::as_str) {
            Some("MistralForCausalLM") => "mistral",
            Some("LlamaForCausalLM") => "llama",
            Some("Qwen2ForCausalLM") => "qwen2",
            other => {
                return Err(ConfigError::UnsupportedArchitecture {
                    path: path.to_owned(),
                    found: other.unwrap_or("<none>").to_owned(),
                });
            }
        };
        let hidden_size = raw.hidden_size.ok_or_else(|| missing("hidden_size"))?;
        let num_layers = raw
            .num_hidden_layers
            .ok_or_else(|| missing("num_hidden_layers"))?;
        let num_heads = raw
            .num_attention_heads
            .ok_or_else(|| missing("num_attention_heads"))?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        let intermediate_size = raw
            .intermediate_size
            .ok_or_else(|| missing("intermediate_size"))?;
        let vocab_size = raw.vocab_size.ok_or_else(|| missing("vocab_size"))?;
        let rms_norm_eps = raw.rms_norm_eps.ok_or_else(|| missing("rms_norm_eps"))?;
        let max_position_embeddings = raw
            .max_position_embeddings
            .ok_or_else(|| missing("max_position_embeddings"))?;

        let head_dim = match raw.head_dim {
            Some(d) => d,
            None => match hidden_size.checked_rem(num_heads) {
                Some(0) => hidden_size / num_heads,
                Some(_) => {
                    return Err(unsupported(
                        "num_attention_heads",
                        num_heads.to_string(),
                        "must divide hidden_size when head_dim is absent",
                    ));
                }
                // No heads: `validate` below refuses num_attention_heads = 0.
                None => 0,
            },
        };

        // transformers 5 groups θ and the scaling in `rope_parameters`; transformers 4 has a
        // top-level `rope_theta` and an optional `rope_scaling`.
        let (rope_theta, rope_scaling) = match (&raw.rope_parameters, &raw.rope_scaling) {
            (Some(params), _) => (
                params
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .or(raw.rope_theta)
                    .ok_or_else(|| missing("rope_parameters.rope_theta"))?,
                rope_scaling(path, "rope_parameters", params)?,
            ),
            (None, Some(scaling)) if !scaling.is_null() => (
                raw.rope_theta.unwrap_or(10_000.0),
                rope_scaling(path, "rope_scaling", scaling)?,
            ),
            (None, _) => (raw.rope_theta.unwrap_or(10_000.0), None),
        };
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(unsupported(
                "hidden_act",
                act.to_owned(),
                "supported: silu (the MLP is exported as SiLU-gated)",
            ));
        }
        // Qwen2 always adds a bias to q, k and v; Llama's `attention_bias` adds one to the
        // output projection too, which the graph does not.
        let attention_bias = family == "qwen2";
        if raw.attention_bias {
            return Err(unsupported(
                "attention_bias",
                "true".into(),
                "supported: false; q/k/v biases with Qwen2ForCausalLM",
            ));
        }
        // Qwen2 configs name a window they do not use unless `use_sliding_window` is set.
        let sliding_window = match (family, raw.use_sliding_window) {
            ("qwen2", Some(true)) => {
                return Err(unsupported(
                    "use_sliding_window",
                    "true".into(),
                    "supported: false, full attention in every layer",
                ));
            }
            ("qwen2", _) => None,
            _ => raw.sliding_window,
        };
        if raw.mlp_bias {
            return Err(unsupported(
                "mlp_bias",
                "true".into(),
                "supported: false (the MLP projections are exported without bias)",
            ));
        }
        let dtype = match raw.dtype.as_deref().or(raw.torch_dtype.as_deref()) {
            None => None,
            Some(name) => Some(SourceDtype::from_hf_name(name).ok_or_else(|| {
                unsupported(
                    "torch_dtype",
                    name.to_owned(),
                    "supported: bfloat16, float16, float32",
                )
            })?),
        };

        let architecture = Architecture {
            family: family.to_owned(),
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            vocab_size,
            rope_theta,
            rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            context_length: max_position_embeddings,
            max_context_length: Some(max_position_embeddings),
            sliding_window,
            rope_scaling,
            attention_bias,
        };
        architecture
            .validate()
            .map_err(|e| ConfigError::architecture(path, |f| config_key(f).to_owned(), e))?;
        Ok(ModelConfig {
            architecture,
            dtype,
            max_position_embeddings,
            sliding_window,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(|ids| ids.to_vec()).unwrap_or_default(),
            pad_token_id: raw.pad_token_id,
        })
    }
}

/// The rope types the exporter folds into the rotary caches, as the refusal lists them.
pub const SUPPORTED_ROPE_TYPES: &str = "supported: default, linear, llama3";

/// The scaling a `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5) object
/// describes, `None` for the default rotary embedding; `key` is the object's, for errors.
fn rope_scaling(
    path: &Path,
    key: &str,
    object: &Value,
) -> Result<Option<RopeScaling>, ConfigError> {
    let kind = object
        .get("rope_type")
        .or_else(|| object.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |field: &str| -> Result<f64, ConfigError> {
        let value = object.get(field).ok_or_else(|| ConfigError::Missing {
            path: path.to_owned(),
            key: format!("{key}.{field}"),
        })?;
        value
            .as_f64()
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| ConfigError::Unsupported {
                path: path.to_owned(),
                key: format!("{key}.{field}"),
                value: value.to_string(),
                why: "supported: a positive number",
            })
    };
    let scaling = match kind {
        "default" => return Ok(None),
        "linear" => RopeScaling::Linear {
            factor: number("factor")?,
        },
        "llama3" => {
            let low_freq_factor = number("low_freq_factor")?;
            let high_freq_factor = number("high_freq_factor")?;
            if high_freq_factor <= low_freq_factor {
                return Err(ConfigError::Unsupported {
                    path: path.to_owned(),
                    key: format!("{key}.high_freq_factor"),
                    value: high_freq_factor.to_string(),
                    why: "supported: a value above low_freq_factor",
                });
            }
            RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: number("original_max_position_embeddings")?
                    as usize,
            }
        }
        other => {
            return Err(ConfigError::Unsupported {
                path: path.to_owned(),
                key: format!("{key}.rope_type"),
                value: other.to_owned(),
                why: SUPPORTED_ROPE_TYPES,
            });
        }
    };
    Ok(Some(scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json(Path::new("config.json"), text)
    }

    #[test]
    fn transformers4_style_is_read() {
        let cfg = parse(
            r#"{"architectures":["MistralForCausalLM"],"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":128,
            "vocab_size":100,"rope_theta":10000.0,"rms_norm_eps":1e-5,"torch_dtype":"bfloat16",
            "max_position_embeddings":4096,"sliding_window":null,"eos_token_id":2}"#,
        )
        .unwrap();
        assert_eq!(cfg.architecture.family, "mistral");
        assert_eq!(cfg.architecture.head_dim, 16);
        assert_eq!(cfg.architecture.rope_theta, 10000.0);
        assert_eq!(cfg.dtype, Some(SourceDtype::Bf16));
        assert_eq!(cfg.eos_token_ids, vec![2]);
        assert!(!cfg.architecture.tie_word_embeddings);
    }

    #[test]
    fn transformers5_style_is_read() {
        let cfg = parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":1,"head_dim":32,"intermediate_size":96,
            "vocab_size":100,"rope_parameters":{"rope_type":"default","rope_theta":500000.0},
            "rms_norm_eps":1e-6,"dtype":"float32","tie_word_embeddings":true,
            "max_position_embeddings":2048,"eos_token_id":[2,3]}"#,
        )
        .unwrap();
        assert_eq!(cfg.architecture.head_dim, 32);
        assert_eq!(cfg.architecture.rope_theta, 500000.0);
        assert_eq!(cfg.dtype, Some(SourceDtype::F32));
        assert_eq!(cfg.eos_token_ids, vec![2, 3]);
        assert!(cfg.architecture.tie_word_embeddings);
    }

    #[test]
    fn an_unknown_rope_type_is_refused_by_key() {
        let err = parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"intermediate_size":96,"vocab_size":100,"rms_norm_eps":1e-6,
            "max_position_embeddings":2048,"rope_scaling":{"rope_type":"yarn","factor":8.0}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`rope_scaling.rope_type` = yarn") && err.contains("llama3"),
            "{err}"
        );
    }

    #[test]
    fn llama3_rope_scaling_is_read_in_both_styles() {
        let head = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":96,
            "vocab_size":100,"rms_norm_eps":1e-6,"max_position_embeddings":131072,"#;
        let llama3 = r#""factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192"#;
        let v4 = parse(&format!(
            r#"{head}"rope_theta":500000.0,"rope_scaling":{{"rope_type":"llama3",{llama3}}}}}"#
        ))
        .unwrap();
        let v5 = parse(&format!(
            r#"{head}"rope_parameters":{{"rope_type":"llama3","rope_theta":500000.0,{llama3}}}}}"#
        ))
        .unwrap();
        let expected = Some(RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        assert_eq!(v4.architecture.rope_scaling, expected);
        assert_eq!(v5.architecture.rope_scaling, expected);
        assert_eq!(v5.architecture.rope_theta, 500000.0);

        let err = parse(&format!(
            r#"{head}"rope_scaling":{{"rope_type":"llama3","factor":32.0}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`rope_scaling.low_freq_factor`"), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_biases_and_ignores_an_unused_window() {
        let qwen2 = r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "intermediate_size":96,"vocab_size":100,"rms_norm_eps":1e-6,"rope_theta":1e6,
            "max_position_embeddings":32768,"sliding_window":4096,"#;
        let cfg = parse(&format!(r#"{qwen2}"use_sliding_window":false}}"#)).unwrap();
        assert_eq!(cfg.architecture.family, "qwen2");
        assert!(cfg.architecture.attention_bias);
        assert_eq!(cfg.sliding_window, None);
        let err = parse(&format!(r#"{qwen2}"use_sliding_window":true}}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`use_sliding_window` = true"), "{err}");
    }

    #[test]
    fn other_architectures_are_refused() {
        let err = parse(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        assert!(matches!(err, ConfigError::UnsupportedArchitecture { .. }));
        assert!(err.to_string().contains("GPT2LMHeadModel"));
    }

    #[test]
    fn a_shape_the_bundle_cannot_hold_is_refused_by_key() {
        let err = parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":3,"intermediate_size":96,
            "vocab_size":100,"rms_norm_eps":1e-6,"max_position_embeddings":2048}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("config.json") && err.contains("`num_key_value_heads` = 3"),
            "{err}"
        );
    }
}
