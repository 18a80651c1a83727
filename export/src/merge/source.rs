//! A SLERP merge seen as a checkpoint: the converter and the checkpoint writer read merged
//! tensors from it one at a time, each computed when asked for from the two mapped parents.
//!
//! Everything that can be checked without reading weights is checked when it is opened: the
//! config, both parents' `config.json`, every tensor's presence, dtype and shape in both
//! safetensors headers, and `t` for every tensor. A merge that would fail on its last tensor
//! fails before its first.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use marengo_bundle::layout::{EMBEDDING, FINAL_NORM, LAYER_MODULES, LM_HEAD, layer_tensor};
use marengo_bundle::manifest::Architecture;

use super::config::{MergeConfig, MergeConfigError};
use super::slerp::{Coefficients, Operand, Slerp};
use crate::atomic_dir::AtomicDirError;
use crate::checkpoint::hf_dir::HfCheckpoint;
use crate::checkpoint::{
    CheckpointError, CheckpointSource, ModelConfig, SourceDigest, SourceDtype, SourceTensor,
    TensorBytes, TokenizerFiles, file_digest,
};
use crate::hf_writer::HfWriteError;

/// Why a merge cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Config(#[from] MergeConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "the parents differ in {field}: {base_value} in {base} but {other_value} in {other}; \
         SLERP needs two models of the same architecture"
    )]
    Architecture {
        field: &'static str,
        base: PathBuf,
        base_value: String,
        other: PathBuf,
        other_value: String,
    },
    #[error("{config}: layers {start}..{end} of {model} do not exist (it has {layers})")]
    Layers {
        config: PathBuf,
        model: PathBuf,
        start: usize,
        end: usize,
        layers: usize,
    },
    #[error(
        "{config}: the two models have {base_layers} and {other_layers} layers; merge them \
         slice by slice with layer ranges of equal length"
    )]
    LayerCounts {
        config: PathBuf,
        base_layers: usize,
        other_layers: usize,
    },
    #[error("{config}: no t for tensor {tensor} (no filter matches it and there is no default)")]
    MissingT { config: PathBuf, tensor: String },
    #[error("tensor {tensor} is missing from {model}")]
    MissingTensor { tensor: String, model: PathBuf },
    #[error(
        "tensor {tensor} has shape {base_shape:?} in {base} but {other_shape:?} in {other}; \
         SLERP needs tensors of the same shape"
    )]
    Shape {
        tensor: String,
        base: PathBuf,
        base_shape: Vec<usize>,
        other: PathBuf,
        other_shape: Vec<usize>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Target(#[from] AtomicDirError),
    #[error(transparent)]
    Write(#[from] HfWriteError),
}

/// One output tensor and where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    /// Its name in the merged model.
    pub name: String,
    pub base_name: String,
    pub other_name: String,
    pub shape: Vec<usize>,
    /// `t` as mergekit resolves it, before rounding to f32.
    pub t: f64,
    /// Dtypes of the two parents' tensors.
    pub base_dtype: SourceDtype,
    pub other_dtype: SourceDtype,
    /// The merge dtype: `dtype` of the config, else the parents' common dtype.
    pub work: SourceDtype,
    /// The stored dtype: `out_dtype` of the config, else `work`.
    pub out: SourceDtype,
}

impl PlannedTensor {
    /// Elements of the tensor.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the merged tensor.
    pub fn out_bytes(&self) -> u64 {
        (self.len() * self.out.size()) as u64
    }
}

/// An opened, fully checked SLERP merge.
pub struct MergedCheckpoint {
    config: MergeConfig,
    base: HfCheckpoint,
    other: HfCheckpoint,
    model: ModelConfig,
    tensors: Vec<PlannedTensor>,
    index: HashMap<String, usize>,
}

/// `torch.promote_types` over the three float dtypes: equal stays, anything else meets in f32.
fn promote(a: SourceDtype, b: SourceDtype) -> SourceDtype {
    if a == b { a } else { SourceDtype::F32 }
}

/// One compared `config.json` field: its name and how to print it from an [`Architecture`].
type Field = fn(&Architecture) -> String;

fn compare_architectures(
    base: &HfCheckpoint,
    other: &HfCheckpoint,
    config: &MergeConfig,
) -> Result<(), MergeError> {
    let (a, b) = (&base.config().architecture, &other.config().architecture);
    let fields: [(&'static str, Field); 12] = [
        ("architecture", |x| x.family.clone()),
        ("hidden_size", |x| x.hidden_size.to_string()),
        ("num_attention_heads", |x| x.num_heads.to_string()),
        ("num_key_value_heads", |x| x.num_kv_heads.to_string()),
        ("head_dim", |x| x.head_dim.to_string()),
        ("intermediate_size", |x| x.intermediate_size.to_string()),
        ("vocab_size", |x| x.vocab_size.to_string()),
        ("rope_theta", |x| x.rope_theta.to_string()),
        ("rms_norm_eps", |x| x.rms_norm_eps.to_string()),
        ("tie_word_embeddings", |x| x.tie_word_embeddings.to_string()),
        ("rope_scaling", |x| format!("{:?}", x.rope_scaling)),
        ("attention_bias", |x| x.attention_bias.to_string()),
    ];
    for (field, get) in fields {
        let (base_value, other_value) = (get(a), get(b));
        if base_value != other_value {
            return Err(MergeError::Architecture {
                field,
                base: config.base.clone(),
                base_value,
                other: config.other.clone(),
                other_value,
            });
        }
    }
    Ok(())
}

impl MergedCheckpoint {
    /// Reads the merge config and both parents' headers, and plans every output tensor.
    pub fn open(config_path: &Path) -> Result<Self, MergeError> {
        let config = MergeConfig::from_file(config_path)?;
        let base = HfCheckpoint::open(&config.base)?;
        let other = HfCheckpoint::open(&config.other)?;
        compare_architectures(&base, &other, &config)?;

        // Each slice as (base start, other start, length), ranges checked against the models.
        let base_layers = base.config().architecture.num_layers;
        let other_layers = other.config().architecture.num_layers;
        let mut slices = Vec::new();
        for slice in &config.slices {
            let (b, o) = match (slice.base_layers, slice.other_layers) {
                (Some(b), Some(o)) => (b, o),
                _ if base_layers != other_layers => {
                    return Err(MergeError::LayerCounts {
                        config: config.file.clone(),
                        base_layers,
                        other_layers,
                    });
                }
                _ => ((0, base_layers), (0, other_layers)),
            };
            for ((start, end), layers, model) in [
                (b, base_layers, &config.base),
                (o, other_layers, &config.other),
            ] {
                if end > layers {
                    return Err(MergeError::Layers {
                        config: config.file.clone(),
                        model: model.clone(),
                        start,
                        end,
                        layers,
                    });
                }
            }
            slices.push((b.0, o.0, b.1 - b.0));
        }

        let mut model = base.config().clone();
        model.architecture.num_layers = slices.iter().map(|s| s.2).sum();
        let tied = model.architecture.tie_word_embeddings;

        // (output name, base name, other name, slice, relative depth), in mergekit's order:
        // embedding, each layer of each slice, final norm, LM head. Tensors outside the layers
        // take t at depth 0, from the first slice (embedding) or the last (norm, head).
        let mut sources = vec![(
            EMBEDDING.to_owned(),
            EMBEDDING.to_owned(),
            EMBEDDING.to_owned(),
            0,
            0.0,
        )];
        let mut out_layer = 0;
        for (index, &(base_start, other_start, len)) in slices.iter().enumerate() {
            for i in 0..len {
                let pos = if len > 1 {
                    i as f64 / (len - 1) as f64
                } else {
                    1.0
                };
                for module in LAYER_MODULES {
                    sources.push((
                        layer_tensor(out_layer, module),
                        layer_tensor(base_start + i, module),
                        layer_tensor(other_start + i, module),
                        index,
                        pos,
                    ));
                }
                out_layer += 1;
            }
        }
        let last = slices.len() - 1;
        sources.push((
            FINAL_NORM.to_owned(),
            FINAL_NORM.to_owned(),
            FINAL_NORM.to_owned(),
            last,
            0.0,
        ));
        if !tied {
            sources.push((
                LM_HEAD.to_owned(),
                LM_HEAD.to_owned(),
                LM_HEAD.to_owned(),
                last,
                0.0,
            ));
        }

        let mut tensors = Vec::with_capacity(sources.len());
        for (name, base_name, other_name, slice, pos) in sources {
            let t = config
                .t_for(slice, &name, pos)
                .ok_or_else(|| MergeError::MissingT {
                    config: config.file.clone(),
                    tensor: name.clone(),
                })?;
            let header = |checkpoint: &HfCheckpoint, tensor: &str, dir: &Path| {
                checkpoint
                    .header_of(tensor)
                    .map(|(dtype, shape)| (dtype, shape.to_vec()))
                    .ok_or_else(|| MergeError::MissingTensor {
                        tensor: tensor.to_owned(),
                        model: dir.to_owned(),
                    })
            };
            let (base_dtype, base_shape) = header(&base, &base_name, &config.base)?;
            let (other_dtype, other_shape) = header(&other, &other_name, &config.other)?;
            if base_shape != other_shape {
                return Err(MergeError::Shape {
                    tensor: name,
                    base: config.base.clone(),
                    base_shape,
                    other: config.other.clone(),
                    other_shape,
                });
            }
            let work = config.dtype.unwrap_or(promote(base_dtype, other_dtype));
            tensors.push(PlannedTensor {
                name,
                base_name,
                other_name,
                shape: base_shape,
                t,
                base_dtype,
                other_dtype,
                work,
                out: config.out_dtype.unwrap_or(work),
            });
        }
        for extra in base
            .tensor_names()
            .iter()
            .filter(|n| !tensors.iter().any(|t| &t.base_name == *n))
        {
            tracing::warn!(tensor = %extra, "not a Mistral/Llama weight; left out of the merge");
        }
        if let Some(first) = tensors.first() {
            let out = first.out;
            model.dtype = tensors.iter().all(|t| t.out == out).then_some(out);
        }
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(MergedCheckpoint {
            config,
            base,
            other,
            model,
            tensors,
            index,
        })
    }

    /// The validated config.
    pub fn merge_config(&self) -> &MergeConfig {
        &self.config
    }

    /// The base model, whose `config.json` and tokenizer the merge keeps.
    pub fn base(&self) -> &HfCheckpoint {
        &self.base
    }

    /// Every output tensor, in output order.
    pub fn planned(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    /// Merges one planned tensor; returns its bytes (in `out` dtype) and the coefficients.
    pub fn merge_tensor(
        &self,
        planned: &PlannedTensor,
    ) -> Result<(Vec<u8>, Coefficients), MergeError> {
        let a = self.base.tensor(&planned.base_name)?;
        let b = self.other.tensor(&planned.other_name)?;
        let slerp = Slerp {
            t: planned.t as f32,
            work: planned.work,
            out: planned.out,
        };
        let (bytes, coefficients) = slerp.merge(
            Operand {
                dtype: a.dtype,
                bytes: &a.bytes,
            },
            Operand {
                dtype: b.dtype,
                bytes: &b.bytes,
            },
            planned.len(),
        );
        tracing::debug!(
            tensor = %planned.name,
            t = planned.t,
            base = coefficients.base,
            other = coefficients.other,
            linear = coefficients.linear,
            cos_theta = coefficients.dot,
            "merged"
        );
        Ok((bytes, coefficients))
    }
}

impl CheckpointSource for MergedCheckpoint {
    fn config(&self) -> &ModelConfig {
        &self.model
    }

    fn tensor_names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    fn tensor(&self, name: &str) -> Result<SourceTensor<'_>, CheckpointError> {
        let planned = self
            .index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_owned(),
                file: None,
            })?;
        let (bytes, _) = self.merge_tensor(planned).map_err(|e| match e {
            MergeError::Checkpoint(inner) => inner,
            other => CheckpointError::Malformed {
                path: self.config.file.clone(),
                message: other.to_string(),
            },
        })?;
        Ok(SourceTensor {
            name: name.to_owned(),
            dtype: planned.out,
            shape: planned.shape.clone(),
            bytes: TensorBytes::Owned(Cow::Owned(bytes)),
            file: self.config.file.clone(),
        })
    }

    fn tokenizer(&self) -> Result<TokenizerFiles, CheckpointError> {
        self.base.tokenizer()
    }

    fn digests(&self) -> Result<Vec<SourceDigest>, CheckpointError> {
        let mut out = vec![file_digest(&self.config.file)?];
        out.extend(self.base.digests()?);
        out.extend(self.other.digests()?);
        Ok(out)
    }

    fn total_tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(PlannedTensor::out_bytes).sum()
    }
}
